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


def main() -> int:
    import hydra
    from omegaconf import DictConfig

    from trainer.config import register_configs

    register_configs()
    sys.argv = [sys.argv[0]] + _rank_overrides(sys.argv[1:])
    outcome: dict = {}

    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
    def _entry(cfg: DictConfig) -> None:
        try:
            result = run(cfg)
        except Exception:
            log.exception("training failed (rank %s); see %s/logs", os.environ.get("RANK", "0"), cfg.out_dir)
            raise
        else:
            outcome.update(result)
            if os.environ.get("RANK", "0") in ("", "0"):
                print(f"[trainer] done: step {result['step']}, metrics in {Path(cfg.out_dir) / 'metrics.json'}",
                      flush=True)

    _entry()
    return 0 if outcome else 1


if __name__ == "__main__":
    sys.exit(main())
