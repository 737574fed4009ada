"""Model selection: the best-on-validation checkpoint, reported beside the final model.

With ``train.select_metric`` set, every validation pass (``train.eval_every`` and the final one)
is offered to :class:`BestCheckpoint`. An improvement exports the model as
``<out_dir>/best/weights_<step>.pt`` and evaluates it on the test split at once (selection reads
validation only; the test numbers are recorded, never compared), so the best model's test
metrics need no reload of its weights at the end, under any parallel strategy. Its state (the
validation curve, the best step, value and metrics) is saved in every checkpoint, so a resumed
run keeps selecting where it stopped; weight files of steps after the checkpoint it resumed
from (a future that was not kept) are deleted on resume.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

#: Metric names (the part after the last '/') where lower is better; any other is higher-better.
LOWER_IS_BETTER = frozenset({"abs_rel", "sq_rel", "rmse", "rmse_log", "mse", "mae", "epe", "fl_all", "loss", "ce",
                             "photometric", "reprojection"})
_FILE = re.compile(r"^weights_(\d+)\.pt$")


def direction(metric: str, mode: str = "auto") -> str:
    """``max`` or ``min`` for ``metric`` (``auto``: min for :data:`LOWER_IS_BETTER`, else max)."""
    if mode not in ("auto", "max", "min"):
        raise ValueError(f"train.select_mode={mode!r}: expected auto, max or min")
    if mode != "auto":
        return mode
    return "min" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "max"


class BestCheckpoint:
    """Tracks the best validation value of one metric; ``Stateful`` (saved with checkpoints)."""

    def __init__(self, metric: str, mode: str, folder: Path) -> None:
        self.metric, self.mode, self.folder = metric, direction(metric, mode), Path(folder)
        self.step: Optional[int] = None
        self.value: Optional[float] = None
        self.val: dict[str, float] = {}
        self.test: dict[str, float] = {}
        self.curve: list[tuple[int, float]] = []
        self.saved_step: Optional[int] = None
        """The best step that the newest checkpoint holds (its weights file must stay)."""

    def offer(self, step: int, val: dict[str, float]) -> bool:
        """Record the validation of ``step`` on the curve; True when it beats the best so far
        (a NaN never does). Raises a KeyError naming the metrics there are when it is missing."""
        if self.metric not in val:
            raise KeyError(f"train.select_metric={self.metric!r}: no such validation metric "
                           f"(there are: {', '.join(sorted(val))})")
        value = float(val[self.metric])
        self.curve.append((int(step), value))
        if math.isnan(value):
            return False
        if self.value is not None and not (value > self.value if self.mode == "max" else value < self.value):
            return False
        self.step, self.value, self.val, self.test = int(step), value, dict(val), {}
        return True

    def weights_path(self, step: Optional[int] = None) -> Path:
        """The best model's weights file (of ``step``, default the best step)."""
        return self.folder / f"weights_{self.step if step is None else step}.pt"

    def prune(self) -> None:
        """Delete the weight files of every step but the best one and the one the last checkpoint
        names (a resume from that checkpoint needs it). Logging rank only."""
        if not self.folder.is_dir():
            return
        keep = {self.step, self.saved_step}
        for p in self.folder.iterdir():
            m = _FILE.match(p.name)
            if m and int(m.group(1)) not in keep:
                p.unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` reports under ``best``."""
        return {"metric": self.metric, "mode": self.mode, "step": self.step, "value": self.value,
                "val": self.val, "test": self.test,
                "weights": str(self.weights_path()) if self.step is not None else None,
                "curve": [list(point) for point in self.curve]}

    def state_dict(self) -> dict[str, Any]:
        self.saved_step = self.step  # called as the checkpoint is written
        return {"metric": self.metric, "mode": self.mode, "step": self.step, "value": self.value,
                "val": dict(self.val), "test": dict(self.test), "curve": [list(p) for p in self.curve]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["metric"] != self.metric or state["mode"] != self.mode:
            raise ValueError(f"the checkpoint selected on {state['mode']} {state['metric']}, this run on "
                             f"{self.mode} {self.metric}: train.select_metric / select_mode cannot change on resume")
        self.step, self.value = state["step"], state["value"]
        self.saved_step = self.step
        self.val, self.test = dict(state["val"]), dict(state["test"])
        self.curve = [(int(s), float(v)) for s, v in state["curve"]]
