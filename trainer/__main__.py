"""`python -m trainer key=value ...`: the thin Hydra entry point (check, build, train, close).

The config is composed and checked first, without importing torch (:mod:`trainer.compose`): a
typo, a wrong option or ``--help`` / ``--cfg job`` answer in about a second, config errors in one
line with exit 2. Then Hydra runs the job. Under torchrun every rank runs this; only rank 0 lets
Hydra write ``<out_dir>/.hydra``; each rank logs to ``<out_dir>/logs/rank<N>.log``.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from trainer.compose import CONFIG_DIR, config_options, load_run_config
from trainer.errors import CONFIG_ERROR_EXIT, ConfigError

log = logging.getLogger("geoprime.main")

#: Hydra's flags that only print something (the job does not run): exit 0 after them
_INFO_FLAGS = ("--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc")
#: Hydra's flags that change what is composed or run: the early check leaves those to Hydra
_HYDRA_ONLY = ("--multirun", "-m", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
               "--experimental-rerun", "--package", "-p")
#: Hydra's flags whose value is the next word
_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
               "-cd", "--experimental-rerun")


def usage() -> str:
    """``python -m trainer --help``: the tasks, the common overrides and where the docs are."""
    groups = {g: ", ".join(config_options(g)) for g in ("task", "data", "model", "parallel", "tracking", "experiment")}
    return f"""usage: python -m trainer [key=value ...] [--cfg job [--resolve]] [-h] [--hydra-help]

Train one job: a pre-training (task=depth | flow | classification), or a segmentation fine-tuning
from one (task=segmentation task.init=depth_full task.weights=<pre-training out_dir>/weights.pt).
Settings are Hydra overrides: group=option picks a file in configs/<group>/, key=value sets a field.

config groups (default first):
  task=        {groups['task']}   (default depth)
  data=        {groups['data']}   (default synthetic: python -m data_shards build synthetic --out data/synthetic)
  model=       {groups['model']}
  parallel=    {groups['parallel']}
  tracking=    {groups['tracking']}   (none: no MLflow)
  +experiment= {groups['experiment']}   (reference-study presets)

common overrides:
  train.steps=1000 train.batch_size=8   optimizer steps; per-rank batch size
  data.root=data/synthetic              shards folder or URL (http(s)://, s3://)
  data.num_workers=2                    loader worker processes per rank
  out_dir=outputs/my-run                run folder (default outputs/<task>-<hash of the overrides>: one per
                                        command line; the same command resumes there after a stop)
  optim.name=adamw optim.lr=1e-4        optimizer (adamw | adam | sgd) and peak learning rate
  parallel.precision=bf16               fp32 | bf16 | fp16
  train.resume=auto                     auto (latest whole checkpoint in out_dir) | never | <checkpoint folder>
  train.progress=false                  no progress bar (logs only)
  several processes / nodes: python -m launch run <overrides> --gpus-per-node N (see README, Launching)

options:
  --cfg job [--resolve]   print the composed config (every key, its value) and exit
  --hydra-help            Hydra's own flags (--multirun, --info, ...)
  -h, --help              this help

exit codes: 0 done (weights.pt and metrics.json in out_dir); 2 config error (one line, nothing trained);
130 Ctrl-C, 143 SIGTERM (a whole checkpoint was written: the same command resumes); 1 any other failure
(traceback, also in <out_dir>/logs/rank<N>.log).
docs: README.md, docs/engine.md (runs, checkpoints, errors), docs/depth.md, docs/transfer.md, docs/data.md;
every field with its meaning: trainer/config.py and trainer/tasks/<task>_config.py
"""


def _rank() -> str:
    return os.environ.get("RANK", "0") or "0"


def _rank_overrides(argv: list[str]) -> list[str]:
    """Non-zero ranks must not write Hydra's output folder (rank 0 writes it once)."""
    if _rank() != "0" and not any(a.startswith("hydra.output_subdir") for a in argv):
        return argv + ["hydra.output_subdir=null"]
    return argv


def _error(message: str) -> int:
    """One line on stderr (with the rank when there are several), the config-error exit code."""
    many = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    print(f"[trainer] error{f' (rank {_rank()})' if many else ''}: {message}", file=sys.stderr, flush=True)
    return CONFIG_ERROR_EXIT


def _print_config(cfg, flags: list[str]) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(cfg, resolve="--resolve" in flags), end="")
    return 0


def run(cfg) -> dict:
    """Train the run described by the composed config; returns the final metrics."""
    from trainer.allocator import keep_freed_memory
    from trainer.loop import train
    from trainer.threads import configure_threads

    configure_threads(int(cfg.data.num_workers))  # no oversubscription with loader workers / ranks
    keep_freed_memory()  # no page faults on each step's buffers (trainer/allocator.py)
    return train(cfg)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(flags with their values, overrides): Hydra's ``--cfg job`` / ``-c job`` / ``--package P``
    take a value in the next word."""
    flags: list[str] = []
    overrides: list[str] = []
    takes_value = False
    for a in argv:
        if takes_value or (flags and flags[-1] in ("--info", "-i") and "=" not in a and a[:1] not in "+~"):
            flags.append(a)  # the flag's value (--info's is optional: a word that is no override)
            takes_value = False
        elif a.startswith("-"):
            flags.append(a)
            takes_value = a in _WITH_VALUE
        else:
            overrides.append(a)
    return flags, overrides


def main(argv: list[str] | None = None) -> int:
    from trainer.checkpointing.interrupts import stop_with_launcher

    stop_with_launcher()  # a rank under torchrun stops (checkpoints) when torchrun dies, however it dies
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(usage(), end="")
        return 0
    flags, overrides = split_argv(argv)
    names = [f.split("=")[0] for f in flags if f.startswith("-")]
    if not any(n in _HYDRA_ONLY or n in _INFO_FLAGS for n in names):
        try:
            cfg, overrides = load_run_config(overrides)
        except ConfigError as e:
            return _error(str(e))
        if _cfg_value(flags) == "job":
            return _print_config(cfg, flags)
    info = any(n in _INFO_FLAGS or n in ("--cfg", "-c") for n in names)
    return _hydra_main(_rank_overrides([*flags, *overrides]), info=info)


def _cfg_value(flags: list[str]) -> str | None:
    """The value of ``--cfg`` / ``-c`` (``job``, ``hydra``, ``all``), if given."""
    for i, f in enumerate(flags):
        if f in ("--cfg", "-c") and i + 1 < len(flags):
            return flags[i + 1]
        if f.startswith("--cfg="):
            return f.split("=", 1)[1]
    return None


def _hydra_main(argv: list[str], info: bool) -> int:
    """Run the job under ``hydra.main`` (output folder, ``.hydra``); every way it ends is one
    exit code, and an error is printed once."""
    import hydra
    from omegaconf import DictConfig

    from trainer.config import register_configs

    register_configs()
    sys.argv = [sys.argv[0], *argv]
    outcome: dict = {}

    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
    def _entry(cfg: DictConfig) -> None:
        outcome["exit"] = _train(cfg)

    _entry()
    return int(outcome.get("exit", 0 if info else 1))


def _train(cfg) -> int:
    """Train; the exit code (a stop by signal: the shell's code for it, after a whole checkpoint)."""
    from trainer.checkpointing.interrupts import Preempted

    try:
        result = run(cfg)
    except Preempted as e:  # a whole checkpoint is written; the same command resumes
        print(f"[trainer] rank {_rank()}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except ConfigError as e:  # cannot heal by retrying: one line, no traceback
        return _error(str(e))
    except Exception:  # a bug or an environment failure: the traceback once (it is also in the log)
        traceback.print_exc()
        print(f"[trainer] failed (rank {_rank()}); the error is also in "
              f"{Path(cfg.out_dir) / 'logs' / f'rank{_rank()}.log'}", file=sys.stderr, flush=True)
        return 1
    if _rank() == "0":
        out = Path(cfg.out_dir)
        weights = f"weights {result['weights']}, " if result.get("weights") else ""
        print(f"[trainer] done: step {result['step']}; {weights}metrics {out / 'metrics.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
