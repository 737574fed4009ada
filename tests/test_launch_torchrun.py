"""`python -m launch run`: the torchrun command and the sbatch script it builds."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.torchrun import TorchrunJob

ROOT = Path(__file__).resolve().parents[1]


def test_single_node_is_standalone():
    job = TorchrunJob(overrides=["task=depth", "parallel=ddp"], procs_per_node=2, max_restarts=1)
    assert job.display_command() == (
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 GEOPRIME_STOP_GRACE_S=120 torchrun --nproc_per_node=2 --standalone "
        "--max_restarts=1 --shutdown-timeout=120 -m trainer task=depth parallel=ddp")
    assert job.command()[:3] == [sys.executable, "-m", "torch.distributed.run"]


def test_multi_node_uses_c10d_with_a_shared_run_id():
    a = TorchrunJob(overrides=["task=depth"], nodes=2, procs_per_node=8, rdzv="node0:29400")
    b = TorchrunJob(overrides=["task=depth"], nodes=2, procs_per_node=8, rdzv="node0:29400")
    args = a.torchrun_args()
    assert "--nnodes=2" in args and "--rdzv_backend=c10d" in args and "--rdzv_endpoint=node0:29400" in args
    # every node derives the same id from the same command line, and a different job gets another
    assert a.resolved_run_id == b.resolved_run_id
    assert a.resolved_run_id != TorchrunJob(overrides=["task=flow"], nodes=2, rdzv="node0:29400").resolved_run_id
    assert f"--rdzv_id={a.resolved_run_id}" in args


@pytest.mark.parametrize("kw,match", [
    (dict(nodes=2), "--rdzv"),
    (dict(rdzv="nohostport"), "host:port"),
    (dict(procs_per_node=0), "gpus-per-node"),
    (dict(overrides=["--oops"]), "key=value"),
    (dict(grace_s=-1), "--grace"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        TorchrunJob(**kw)


def test_sbatch_script():
    job = TorchrunJob(overrides=["task=depth", "parallel=fsdp"], nodes=4, procs_per_node=8, rdzv="x:29500")
    script = job.sbatch_script(partition="gpu")
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --partition=gpu" in script
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in script and "export GEOPRIME_STOP_GRACE_S=120" in script
    srun = [line for line in script.splitlines() if line.startswith("srun torchrun")][0]
    assert "--nnodes=$SLURM_NNODES" in srun and "--rdzv_endpoint=${head_node}:29500" in srun
    assert "--rdzv_id=$SLURM_JOB_ID" in srun and srun.endswith("-m trainer task=depth parallel=fsdp")


def test_cli_dry_run_prints_the_command():
    r = subprocess.run([sys.executable, "-m", "launch", "run", "task=depth", "--gpus-per-node", "2", "--dry-run"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "torchrun --nproc_per_node=2 --standalone --max_restarts=3 --shutdown-timeout=120 -m trainer task=depth" in r.stdout
    r = subprocess.run([sys.executable, "-m", "launch", "run", "task=depth", "--grace", "600", "--dry-run"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "GEOPRIME_STOP_GRACE_S=600 torchrun" in r.stdout and "--shutdown-timeout=600 -m trainer" in r.stdout
    r = subprocess.run([sys.executable, "-m", "launch", "run", "--nodes", "2"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "--rdzv" in r.stderr


def test_readme_sbatch_line_needs_no_rdzv(capsys):
    """The README's SLURM line: the endpoint comes from the allocation's first node, inside the script."""
    from launch.torchrun import main

    assert main(["task=depth", "--nodes", "4", "--gpus-per-node", "8", "--sbatch"]) == 0
    script = capsys.readouterr().out
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "--rdzv_endpoint=${head_node}:29400" in script and "#SBATCH --nodes=4" in script


def test_overrides_after_flags_are_accepted(capsys):
    from launch.torchrun import main

    assert main(["task=depth", "parallel=ddp", "--gpus-per-node", "2", "--dry-run", "data.root=/d", "seed=3"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("-m trainer task=depth parallel=ddp data.root=/d seed=3")
