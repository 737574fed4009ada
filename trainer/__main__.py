"""`python -m trainer key=value ...`: the thin Hydra entry point (parse, build, train, close).

Under torchrun every rank runs this; only rank 0 lets Hydra write ``<out_dir>/.hydra`` (the
composed config); Hydra's own logging is off, each rank logs to ``<out_dir>/logs/rank<N>.log``.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")

log = logging.getLogger("geoprime.main")


def _rank_overrides(argv: list[str]) -> list[str]:
    """Non-zero ranks must not write Hydra's output folder (rank 0 writes it once)."""
    if os.environ.get("RANK", "0") not in ("", "0") and not any(a.startswith("hydra.output_subdir") for a in argv):
        return argv + ["hydra.output_subdir=null"]
    return argv


def run(cfg) -> dict:
    """Train the run described by the composed config; returns the final metrics."""
    from trainer.loop import train
    from trainer.threads import configure_threads

    configure_threads(int(cfg.data.num_workers))  # no oversubscription with loader workers / ranks
    return train(cfg)


def compose(overrides: list[str]):
    """The run config ``python -m trainer <overrides>`` would get (Hydra's compose API)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def check_job(overrides: list[str], world_size: int) -> None:
    """What a job would fail on before step 1, checked before torchrun starts it (``launch run``):
    the config (unknown keys, task settings), every split, init files, ``out_dir`` and its lock.
    Raises :class:`~trainer.errors.ConfigError` naming the problem."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config import check_known_keys
    from trainer.errors import ConfigError
    from trainer.loop import _build_task
    from trainer.preflight import preflight
    from trainer.run_lock import is_locked

    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"{type(e).__name__}: {e}") from None
    check_known_keys(cfg)
    holder = is_locked(cfg.out_dir)
    if holder:
        raise ConfigError(f"out_dir={cfg.out_dir!r} is in use by {holder}; wait for that job, stop it, "
                          "or use another out_dir")
    preflight(cfg, _build_task(cfg), world_size=world_size)


def main() -> int:
    from trainer.interrupts import stop_with_launcher

    stop_with_launcher()  # a rank under torchrun stops (checkpoints) when torchrun dies, however it dies
    import hydra
    from omegaconf import DictConfig

    from trainer.config import register_configs
    from trainer.errors import CONFIG_ERROR_EXIT, ConfigError
    from trainer.interrupts import Preempted

    register_configs()
    sys.argv = [sys.argv[0]] + _rank_overrides(sys.argv[1:])
    outcome: dict = {}

    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
    def _entry(cfg: DictConfig) -> None:
        rank = os.environ.get("RANK", "0") or "0"
        try:
            result = run(cfg)
        except Preempted as e:  # a whole checkpoint is written; the same command resumes
            print(f"[trainer] rank {rank}: {e}", file=sys.stderr, flush=True)
            outcome["exit"] = e.exit_code
        except ConfigError as e:  # cannot heal by retrying: one line, no traceback
            print(f"[trainer] error (rank {rank}): {e}", file=sys.stderr, flush=True)
            outcome["exit"] = CONFIG_ERROR_EXIT
        except Exception:
            log.exception("training failed (rank %s); the error is also in %s", rank,
                          Path(cfg.out_dir) / "logs" / f"rank{rank}.log")
            raise
        else:
            outcome.update(result)
            if rank == "0":
                print(f"[trainer] done: step {result['step']}, metrics in {Path(cfg.out_dir) / 'metrics.json'}",
                      flush=True)

    _entry()
    if "exit" in outcome:
        return int(outcome["exit"])
    return 0 if outcome else 1


if __name__ == "__main__":
    sys.exit(main())
