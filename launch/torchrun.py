"""`python -m launch run`: build the torchrun command for one or many nodes, print it, run it.

The same command line, run on every node, joins one c10d rendezvous: the run id defaults to
a hash of the job's arguments, so nodes agree on it without talking. ``--sbatch`` prints a
SLURM batch script instead (one srun task per node, each running torchrun).

``--grace`` is how long a stop signal gives the ranks to finish their step and checkpoint before
torchrun SIGKILLs them (torchrun's ``--shutdown-timeout``, also handed to the ranks as
``$GEOPRIME_STOP_GRACE_S`` so that a too-short grace is named); the launcher itself, and a
Kubernetes pod's ``terminationGracePeriodSeconds``, wait :data:`STOP_MARGIN_S` longer.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
from dataclasses import dataclass, field

from launch.supervise import run_supervised
from trainer.checkpointing.stop_record import GRACE_ENV

DEFAULT_RDZV_PORT = 29400
#: Environment torchrun needs for elastic restarts: without it, restarted workers can read the
#: previous attempt's addresses from the shared rendezvous store (pytorch/pytorch#135712).
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
#: seconds ranks get after a stop signal to finish the step in flight and checkpoint (torchrun's own default is 30)
DEFAULT_GRACE_S = 120
#: what the launcher / a pod waits beyond the grace: torchrun's SIGKILL, the tracker closing, the exits
STOP_MARGIN_S = 30


@dataclass
class TorchrunJob:
    """One training job as torchrun sees it: topology, rendezvous, restarts, Hydra overrides."""

    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    procs_per_node: int = 1
    rdzv: str | None = None
    run_id: str | None = None
    max_restarts: int = 0
    rdzv_conf: list[str] = field(default_factory=list)
    module: str = "trainer"
    slurm: bool = False
    """The job runs from an sbatch script, whose first node hosts the rendezvous (no --rdzv needed)."""
    grace_s: int = DEFAULT_GRACE_S
    """Seconds the ranks get after a stop signal to finish their step and checkpoint."""

    def __post_init__(self) -> None:
        if self.grace_s < 0:
            raise ValueError(f"--grace={self.grace_s}: must be >= 0 seconds")
        if self.nodes < 1:
            raise ValueError(f"--nodes={self.nodes}: must be >= 1")
        if self.procs_per_node < 1:
            raise ValueError(f"--gpus-per-node={self.procs_per_node}: must be >= 1 (processes per node)")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts={self.max_restarts}: must be >= 0")
        if self.nodes > 1 and not self.rdzv and not self.slurm:
            raise ValueError(f"--nodes={self.nodes} needs --rdzv host:port (the rendezvous endpoint every node can "
                             "reach), or --sbatch (the script takes the first node of the allocation)")
        if self.rdzv:
            host, _, port = self.rdzv.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--rdzv={self.rdzv!r}: expected host:port, e.g. node0.cluster:{DEFAULT_RDZV_PORT}")
        bad_conf = [c for c in self.rdzv_conf if "=" not in c]
        if bad_conf:
            raise ValueError(f"--rdzv-conf {bad_conf}: expected key=value, e.g. is_host=1")
        bad = [o for o in self.overrides if o.startswith("-")]
        if bad:
            raise ValueError(f"unknown option(s) {bad}: Hydra overrides look like key=value")

    @property
    def resolved_run_id(self) -> str:
        """The rendezvous id: given, or a stable hash of the job (identical on every node)."""
        if self.run_id:
            return self.run_id
        digest = hashlib.sha256(" ".join([str(self.nodes), str(self.procs_per_node), *self.overrides]).encode())
        return f"geoprime-{digest.hexdigest()[:12]}"

    def torchrun_args(self, rdzv_endpoint: str | None = None, nnodes: str | None = None) -> list[str]:
        """torchrun's arguments (without the program name)."""
        args = [f"--nproc_per_node={self.procs_per_node}"]
        endpoint = rdzv_endpoint or self.rdzv
        if self.nodes == 1 and endpoint is None:
            args.append("--standalone")
        else:
            args += [
                f"--nnodes={nnodes or self.nodes}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint={endpoint}",
                f"--rdzv_id={self.resolved_run_id}",
            ]
            if self.rdzv_conf:
                args.append(f"--rdzv_conf={','.join(self.rdzv_conf)}")
        args += [f"--max_restarts={self.max_restarts}", f"--shutdown-timeout={self.grace_s}"]
        return args + ["-m", self.module, *self.overrides]

    @property
    def env(self) -> dict[str, str]:
        """Environment torchrun and its ranks need (restarts, the stop grace)."""
        return {**TORCHRUN_ENV, GRACE_ENV: str(self.grace_s)}

    def command(self) -> list[str]:
        """The command to run here, with this interpreter's torchrun."""
        return [sys.executable, "-m", "torch.distributed.run", *self.torchrun_args()]

    def display_command(self) -> str:
        """The command as a user would type it on each node (with the environment it needs)."""
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{env} " + shlex.join(["torchrun", *self.torchrun_args()])

    def sbatch_script(self, *, job_name: str = "geoprime", time_limit: str = "24:00:00",
                      cpus_per_task: int = 16, partition: str | None = None) -> str:
        """A SLURM batch script: one task per node, torchrun in each, rendezvous on the first node."""
        port = self.rdzv.rpartition(":")[2] if self.rdzv else str(DEFAULT_RDZV_PORT)
        lines = [
            "#!/bin/bash",
            f"#SBATCH --job-name={job_name}",
            f"#SBATCH --nodes={self.nodes}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --gpus-per-node={self.procs_per_node}",
            f"#SBATCH --cpus-per-task={cpus_per_task}",
            f"#SBATCH --time={time_limit}",
        ]
        if partition:
            lines.append(f"#SBATCH --partition={partition}")
        lines += [
            "set -euo pipefail",
            *(f"export {k}={v}" for k, v in self.env.items()),
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            "srun torchrun " + shlex.join(self.torchrun_args(rdzv_endpoint="__HEAD__", nnodes="__NNODES__"))
            .replace("--rdzv_endpoint=__HEAD__", f"--rdzv_endpoint=${{head_node}}:{port}")
            .replace("--nnodes=__NNODES__", "--nnodes=$SLURM_NNODES")
            .replace(f"--rdzv_id={self.resolved_run_id}", "--rdzv_id=$SLURM_JOB_ID"),
        ]
        return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch run",
        usage="python -m launch run [key=value ...] [options]   (overrides and options in any order)",
        description="Run `python -m trainer <overrides>` under torchrun on one or many nodes, after checking the "
                    "whole job here (config, engine settings, model and its init files, data, out_dir): a config "
                    "error is one line, exit 2, and torchrun never starts.",
        epilog="examples:\n"
               "  python -m launch run task=depth parallel=ddp --gpus-per-node 2\n"
               "  python -m launch run task=depth parallel=fsdp --nodes 2 --gpus-per-node 8 --rdzv node0:29400\n"
               "  python -m launch run task=depth parallel=fsdp --nodes 4 --gpus-per-node 8 --sbatch > job.sbatch\n"
               "exit codes: 0 done, 2 config error, 130 / 143 stopped by Ctrl-C / SIGTERM (checkpoint written; "
               "the same command resumes), else torchrun's.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the trainer, e.g. task=depth parallel=ddp "
                                                "(python -m trainer --help lists them)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (run the same command on each)")
    p.add_argument("--gpus-per-node", "--nproc-per-node", dest="procs_per_node", type=int, default=1,
                   help="processes per node (one per GPU; on CPU, one per process you want)")
    p.add_argument("--rdzv", default=None, help="c10d rendezvous endpoint host:port (required for --nodes > 1 "
                                                "unless --sbatch, whose script uses the first node's)")
    p.add_argument("--rdzv-conf", action="append", default=[], metavar="KEY=VALUE",
                   help="extra c10d rendezvous settings, e.g. is_host=1 on the node that hosts the store "
                        "when several 'nodes' share one machine")
    p.add_argument("--run-id", default=None, help="rendezvous id (default: a hash of this job's arguments)")
    p.add_argument("--max-restarts", type=int, default=3, help="elastic restarts before the job fails")
    p.add_argument("--dry-run", action="store_true", help="print the command, check nothing, run nothing")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip checking config, data, init files and out_dir before starting torchrun")
    p.add_argument("--grace", type=int, default=DEFAULT_GRACE_S,
                   help="seconds the ranks get after SIGTERM/SIGINT to finish their step and checkpoint before "
                        f"torchrun SIGKILLs them (the launcher waits {STOP_MARGIN_S} s more)")
    p.add_argument("--sbatch", action="store_true", help="print a SLURM sbatch script instead of running")
    p.add_argument("--partition", default=None, help="SLURM partition (with --sbatch)")
    p.add_argument("--time", default="24:00:00", help="SLURM time limit (with --sbatch)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        job = TorchrunJob(overrides=args.overrides, nodes=args.nodes, procs_per_node=args.procs_per_node,
                          rdzv=args.rdzv, run_id=args.run_id, max_restarts=args.max_restarts,
                          rdzv_conf=args.rdzv_conf, slurm=args.sbatch, grace_s=args.grace)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.sbatch:
        sys.stdout.write(job.sbatch_script(partition=args.partition, time_limit=args.time))
        return 0
    if not (args.dry_run or args.no_preflight):
        code = _preflight(job)
        if code:
            return code
    print(f"[launch] {job.display_command()}", flush=True)
    if job.nodes > 1:
        print(f"[launch] run the same command on each of the {job.nodes} nodes", flush=True)
    if args.dry_run:
        return 0
    return run_supervised(job.command(), env={**os.environ, **job.env}, stop_timeout=job.grace_s + STOP_MARGIN_S)


def _preflight(job: TorchrunJob) -> int:
    """Check what the job would fail on before step 1, once, here: an error that cannot heal must
    not be restarted --max-restarts times on every rank."""
    from trainer.preflight import check_job
    from trainer.errors import CONFIG_ERROR_EXIT, ConfigError

    try:
        check_job(job.overrides, world_size=job.nodes * job.procs_per_node)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    return 0
