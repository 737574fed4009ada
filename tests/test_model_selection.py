"""Model selection (issue 32, item 7): the best-on-validation checkpoint beside the final model.

With ``train.select_metric`` every validation (``train.eval_every`` and the final one) is on the
curve; the best one's weights are exported and scored on test (``test_best/*``), the final model
keeps ``test/*`` (what the study's table reads, said in a run tag). Checked on the loop's tiny task:
the best step is the curve's arg-best, its exported weights give its reported test metric, the
final model's numbers are untouched, and an interrupted run resumes to the same selection.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_loop import N_VAL, RecordingTracker, TinyLoader, TinyTask, tiny_cfg, tiny_loaders
from trainer.errors import ConfigError
from trainer.checkpointing.selection import BestCheckpoint, direction


class TaggingTracker(RecordingTracker):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, str] = {}

    def set_tags(self, tags):
        self.tags.update(tags)


def _train(out, *overrides, tracker=None):
    from trainer.loop import train

    # lr 0.1: the validation error falls, jumps, falls and then creeps up, so the best is not the last
    cfg = tiny_cfg(str(out), "train.eval_every=1", "train.select_metric=mse", "optim.lr=0.1", *overrides)
    return train(cfg, task=TinyTask(cfg.task, cfg.model), tracker=tracker or TaggingTracker(),
                 loaders=tiny_loaders(cfg, 0, 1))


def _test_metric(weights: dict) -> dict:
    task = TinyTask(None, None)
    model = task.build_model()
    model.load_state_dict(weights)
    metric = task.new_metric()
    with torch.no_grad():
        for b in TinyLoader(N_VAL, 0, 1, 2, 0, False):
            metric.update(b, task.eval_step(model, b))
    return metric.compute(metric.state())


def test_direction_and_offers():
    assert direction("abs_rel") == "min" and direction("val/epe") == "min" and direction("miou") == "max"
    assert direction("miou", "min") == "min"
    with pytest.raises(ValueError, match="train.select_mode='best'"):
        direction("miou", "best")
    best = BestCheckpoint("miou", "auto", "unused")
    assert best.offer(1, {"miou": 0.2}) and not best.offer(2, {"miou": 0.1}) and best.offer(3, {"miou": 0.3})
    assert not best.offer(4, {"miou": float("nan")}) and (best.step, best.value) == (3, 0.3)
    assert best.curve[1] == (2, 0.1) and len(best.curve) == 4
    with pytest.raises(KeyError, match=r"select_metric='miou': no such validation metric \(there are: acc\)"):
        best.offer(5, {"acc": 1.0})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("test_split", ["val", "test"])  # the same split (no second pass) or its own test pass
def test_best_checkpoint_is_exported_and_scored_beside_the_final_model(tmp_path, test_split):
    tracker = TaggingTracker()
    res = _train(tmp_path, "train.steps=8", f"data.test_split={test_split}", tracker=tracker)
    best = res["best"]
    curve = [tuple(p) for p in best["curve"]]
    assert [s for s, _ in curve] == list(range(1, 9))
    step, value = min(curve, key=lambda p: p[1])
    assert (best["step"], best["value"], best["mode"]) == (step, value, "min") and step < 8
    assert best["val"]["mse"] == value and best["weights"] == str(tmp_path / "best" / f"weights_{step}.pt")
    assert [p.name for p in (tmp_path / "best").iterdir()] == [f"weights_{step}.pt"]
    # the exported best model gives the test metric reported for it; the final model keeps its own
    assert _test_metric(torch.load(best["weights"], weights_only=True)) == pytest.approx(best["test"], rel=1e-6)
    assert _test_metric(torch.load(tmp_path / "weights.pt", weights_only=True)) == pytest.approx(res["test"], rel=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["best"]["step"] == step
    logged = {k: v for _, m in tracker.metrics for k, v in m.items()}
    assert logged["test_best/mse"] == best["test"]["mse"] and logged["test/mse"] == res["test"]["mse"]
    assert tracker.tags["selection.best_step"] == str(step) and tracker.tags["selection.table_uses"].startswith("final")


@pytest.mark.timeout(180)
def test_an_interrupted_run_resumes_to_the_same_selection(tmp_path):
    ref = _train(tmp_path / "ref", "train.steps=10")
    assert ref["best"]["step"] < 6  # chosen before the checkpoint the run resumes from
    _train(tmp_path / "run", "train.steps=10", "train.ckpt_every=3", "train.keep_last=5")
    ck = tmp_path / "run" / "checkpoints"  # as if it crashed after step 7: checkpoints 3 and 6 remain
    shutil.rmtree(ck / "step_00000010")
    shutil.rmtree(ck / "step_00000009")
    (ck / "latest").write_text("step_00000006\n")
    (tmp_path / "run" / "best" / "weights_8.pt").write_bytes(b"from the lost future")
    res = _train(tmp_path / "run", "train.steps=10", "train.ckpt_every=3", "train.keep_last=5")
    for key in ("step", "value", "curve", "test", "val"):
        assert res["best"][key] == ref["best"][key], key
    assert [p.name for p in (tmp_path / "run" / "best").iterdir()] == [f"weights_{ref['best']['step']}.pt"]
    got = torch.load(res["best"]["weights"], weights_only=True)
    want = torch.load(ref["best"]["weights"], weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.timeout(60)
def test_selection_needs_a_validation_split(tmp_path):
    with pytest.raises(ConfigError, match=r"train.select_metric='mse' selects on validation, but this run has no "
                                          r"validation split"):
        _train(tmp_path, "data.val_split=''")
