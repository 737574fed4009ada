"""The training loop on a tiny task: logs, evaluation counted once, final artifacts, exact resume.

This file is also the torchrun worker of the multi-process loop / elastic tests:
``python tests/test_loop.py key=value ...`` (OmegaConf dotlist overrides of the run config)
trains the tiny task with :func:`trainer.loop.train` and the in-memory resumable loader below.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import RunConfig  # noqa: E402
from trainer.tasks.base import Metric, Task  # noqa: E402

N_TRAIN, N_VAL = 40, 13


# ------------------------------------------------------------------ the tiny task and its data
class TinyMetric(Metric):
    """Sum of squared errors and pixel count over valid samples."""

    def __init__(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64)

    def update(self, batch, outputs):
        valid = batch["__valid__"].to(outputs.device)
        err = ((outputs - batch["target"]) ** 2)[valid]
        self.sums += torch.tensor([err.sum().item(), err.numel(), int(valid.sum())], dtype=torch.float64)

    def state(self):
        return self.sums.clone()

    def compute(self, state):
        return {"mse": float(state[0] / state[1]), "count": float(state[2])}


class TinyTask(Task):
    """Per-pixel regression with a 2-part conv net (no BatchNorm unless ``task.bn=true``: without it,
    ranks agree with one process)."""

    required_keys = ("rgb",)

    def build_model(self) -> nn.ModuleDict:
        # task.bn=true: with BatchNorm, whose running statistics each rank keeps for itself
        norm = [nn.BatchNorm2d(6)] if (self.cfg or {}).get("bn") else []
        return nn.ModuleDict({"enc": nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), *norm, nn.ReLU()),
                              "head": nn.Conv2d(6, 1, 1)})

    def training_step(self, model, batch):
        pred = model["head"](model["enc"](batch["rgb"]))
        loss = ((pred - batch["target"]) ** 2).mean()
        return loss, {"mse": loss.detach()}

    def eval_step(self, model, batch):
        return model["head"](model["enc"](batch["rgb"]))

    def new_metric(self) -> Metric:
        return TinyMetric()


def tiny_sample(i: int) -> dict[str, torch.Tensor]:
    """Sample ``i``: a fixed random image and a target that is a function of it."""
    g = torch.Generator().manual_seed(1000 + i)
    rgb = torch.rand(3, 8, 8, generator=g)
    return {"rgb": rgb, "target": (rgb[:1] * 2 - rgb[1:2]).clone()}


class TinyLoader:
    """In-memory stand-in for ``data_shards.loader.ResumableLoader`` with its contract: one seeded order
    per epoch; step t takes the next world x batch positions (rank r every world-th of them); the state
    is the positions consumed, so a resume on any world size continues exactly. Equal batch counts
    (drop for training, pad for evaluation)."""

    def __init__(self, n: int, rank: int, world: int, batch_size: int, seed: int, train: bool) -> None:
        self.n, self.rank, self.world, self.bs, self.seed, self.train = n, rank, world, batch_size, seed, train
        per_rank = n // world if train else -(-n // world)
        self.batches_per_epoch = n // (world * batch_size) if train else -(-per_rank // batch_size)
        self.epoch, self.samples = 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "samples": self.samples}

    def load_state_dict(self, s):
        self.epoch, self.samples = int(s["epoch"]), int(s["samples"])

    def _indices(self) -> list[int]:
        """This rank's share of the positions not yet consumed."""
        order = list(range(self.n))
        if self.train:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100 + self.epoch)).tolist()
            rest = order[self.samples:]
            rest = rest[: len(rest) // (self.world * self.bs) * self.world * self.bs]
        else:
            rest = order + [-1] * (-(-self.n // self.world) * self.world - self.n)  # padding
        return rest[self.rank::self.world]

    def __iter__(self):
        idx = self._indices()
        for a in range(0, len(idx), self.bs):
            chunk = idx[a:a + self.bs]
            samples = [tiny_sample(max(i, 0)) for i in chunk]
            batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
            batch["__valid__"] = torch.tensor([i >= 0 for i in chunk])
            batch["__key__"] = [f"s{i}" for i in chunk]
            self.samples += len(chunk) * self.world
            yield batch
        self.epoch, self.samples = self.epoch + 1, 0


def tiny_loaders(cfg, rank: int, world: int):
    """Loader factory for :func:`trainer.loop.train`."""
    def make(split: str, train: bool):
        return TinyLoader(N_TRAIN if train else N_VAL, rank, world, int(cfg.train.batch_size), int(cfg.seed), train)
    return make


def tiny_cfg(out_dir: str, *overrides: str):
    """A RunConfig for the tiny task (fp32, CPU, deterministic, no tracking)."""
    cfg = OmegaConf.structured(RunConfig)
    cfg.task = {"name": "tiny"}
    base = [f"out_dir={out_dir}", "train.steps=6", "train.batch_size=2", "train.log_every=2",
            "train.progress=false", "train.deterministic=true", "tracking.enabled=false",
            "optim.lr=0.01", "schedule.warmup_steps=2", "data.test_split=val"]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(base + list(overrides)))


class RecordingTracker:
    """In-test tracker: keeps what it is given."""

    def __init__(self) -> None:
        self.run_id, self.metrics, self.params, self.artifacts, self.status = "run-123", [], {}, [], None
        self.config = None

    def log_params(self, flat):
        self.params.update(flat)

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(path)

    def log_config(self, yaml_text):
        self.config = yaml_text

    def close(self, status="FINISHED"):
        self.status = status


def worker(argv: list[str]) -> None:
    """torchrun entry: train the tiny task with the dotlist overrides in ``argv``."""
    from trainer.distributed import dist_env
    from trainer.loop import train
    from trainer.tracking import Tracker

    env = dist_env()
    cfg = tiny_cfg("unset", *argv)
    train(cfg, task=TinyTask(cfg.task, cfg.model), tracker=Tracker("run-tiny"),
          loaders=tiny_loaders(cfg, env.rank, env.world_size))


def load_weights(out_dir) -> dict[str, torch.Tensor]:
    return torch.load(Path(out_dir) / "weights.pt", weights_only=True)


# ------------------------------------------------------------------ tests (single process)
def _train_single(out_dir, *overrides, tracker=None):
    from trainer.loop import train

    cfg = tiny_cfg(str(out_dir), *overrides)
    return train(cfg, task=TinyTask(cfg.task, cfg.model), tracker=tracker or RecordingTracker(),
                 loaders=tiny_loaders(cfg, 0, 1))


@pytest.mark.timeout(120)
def test_loop_trains_logs_evaluates_and_exports(tmp_path):
    tr = RecordingTracker()
    res = _train_single(tmp_path, "train.eval_every=3", "train.ckpt_every=3", "train.steps=8", tracker=tr)
    # the loss went down on the fixed regression problem
    train_steps = [m for s, m in tr.metrics if "train/loss" in m]
    assert [s for s, m in tr.metrics if "train/loss" in m] == [2, 4, 6, 8]
    assert train_steps[-1]["train/loss"] < train_steps[0]["train/loss"]
    assert {"train/lr", "train/samples_per_s", "train/data_wait_s", "train/grad_norm", "train/mse",
            "train/corrupt_skipped"} <= set(train_steps[0])
    assert train_steps[0]["train/corrupt_skipped"] == 0
    # warm-up 2 steps then cosine over 6: at step 2 (after 2 scheduler steps) the lr is the peak
    assert train_steps[0]["train/lr"] == pytest.approx(0.01)
    # every val sample counted once (13 samples, batches padded)
    vals = [m for s, m in tr.metrics if "val/count" in m]
    assert all(v["val/count"] == N_VAL for v in vals) and len(vals) == 3  # steps 3, 6 and final
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"]["count"] == N_VAL and saved["step"] == 8 and saved["run_id"] == "run-123"
    assert saved["val"]["mse"] == pytest.approx(res["val"]["mse"])
    # exported weights load into the plain model, and give the reported test metric
    task = TinyTask(None, None)
    model = task.build_model()
    model.load_state_dict(load_weights(tmp_path))
    metric = task.new_metric()
    with torch.no_grad():
        for b in TinyLoader(N_VAL, 0, 1, 2, 0, False):
            metric.update(b, task.eval_step(model, b))
    assert metric.compute(metric.state())["mse"] == pytest.approx(saved["test"]["mse"], rel=1e-6)
    # keep_last=2: checkpoints of steps 6 and 8 remain, latest points at 8
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_00000006", "step_00000008"]
    assert (ck / "latest").read_text().strip() == "step_00000008"
    assert tr.status is None and tr.config and "tiny" in tr.config


@pytest.mark.timeout(120)
def test_finished_run_can_drop_its_checkpoints(tmp_path):
    res = _train_single(tmp_path, "train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=false")
    assert res["step"] == 4 and (tmp_path / "weights.pt").is_file() and (tmp_path / "metrics.json").is_file()
    assert not (tmp_path / "checkpoints").exists()
    _train_single(tmp_path / "kept", "train.steps=4", "train.ckpt_every=2")
    assert (tmp_path / "kept" / "checkpoints" / "step_00000004").is_dir()


@pytest.mark.timeout(120)
def test_exact_resume_single_process(tmp_path):
    _train_single(tmp_path / "ref", "train.steps=10")
    ref = load_weights(tmp_path / "ref")
    # an interrupted run: 6 steps with checkpoints every 3, then "restart" asking for 10 steps
    _train_single(tmp_path / "run", "train.steps=10", "train.ckpt_every=3", "train.keep_last=5",
                  "train.export=false")
    # simulate a crash after step 7: only the checkpoints of steps 3 and 6 had been written
    import shutil
    ck = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ck / "step_00000010")
    shutil.rmtree(ck / "step_00000009")
    (ck / "latest").write_text("step_00000006\n")
    res = _train_single(tmp_path / "run", "train.steps=10", "train.ckpt_every=3", "train.keep_last=5")
    assert res["step"] == 10
    got = load_weights(tmp_path / "run")
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.timeout(120)
def test_wall_clock_checkpoint_cadence_is_the_default(tmp_path):
    from trainer.config import TrainConfig

    assert TrainConfig().ckpt_every_minutes == 30.0 and TrainConfig().ckpt_every == 0
    _train_single(tmp_path, "train.steps=4", "train.ckpt_every_minutes=0.00001", "train.keep_last=10")
    assert "no whole checkpoint in" in (tmp_path / "logs" / "rank0.log").read_text()  # said in one line
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [f"step_0000000{i}" for i in (1, 2, 3, 4)]
    _train_single(tmp_path / "off", "train.steps=4", "train.ckpt_every_minutes=0", "train.keep_last=10")
    assert sorted(p.name for p in (tmp_path / "off" / "checkpoints").glob("step_*")) == ["step_00000004"]


@pytest.mark.timeout(120)
def test_lowering_steps_below_the_checkpoint_is_refused(tmp_path):
    """A finished 8-step run asked for 6 steps must not report step 6 with step-8 weights."""
    _train_single(tmp_path, "train.steps=8", "train.ckpt_every=3", "train.keep_last=5")
    before = {p.name: (p / "COMPLETE.json").read_text() for p in (tmp_path / "checkpoints").glob("step_*")}
    with pytest.raises(ValueError, match=r"train.steps=6 is below the checkpoint's step 8"):
        _train_single(tmp_path, "train.steps=6", "train.ckpt_every=3", "train.keep_last=5")
    after = {p.name: (p / "COMPLETE.json").read_text() for p in (tmp_path / "checkpoints").glob("step_*")}
    assert after == before  # step_00000006 was not overwritten


@pytest.mark.timeout(60)
def test_failure_propagates_and_leaves_injected_tracker_to_caller(tmp_path):
    from trainer.loop import train

    class Broken(TinyTask):
        def training_step(self, model, batch):
            raise RuntimeError("boom in step")

    cfg = tiny_cfg(str(tmp_path))
    tr = RecordingTracker()
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, task=Broken(cfg.task, cfg.model), tracker=tr, loaders=tiny_loaders(cfg, 0, 1))
    assert tr.status is None  # an injected tracker belongs to the caller


@pytest.mark.timeout(120)
def test_resumed_run_continues_the_same_tracking_run(tmp_path):
    """The real tracker (MLflow, sqlite in tmp): the run id is kept in the checkpoint and reused."""
    from trainer.loop import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = []
    for steps in (2, 4):
        cfg = tiny_cfg(str(tmp_path / "run"), f"train.steps={steps}", "tracking.enabled=true",
                       f"tracking.uri={uri}", "tracking.system_metrics_every=0")
        train(cfg, task=TinyTask(cfg.task, cfg.model), loaders=tiny_loaders(cfg, 0, 1))
        ids.append(json.loads((tmp_path / "run" / "metrics.json").read_text())["run_id"])
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000004" / "train_state.pt", weights_only=True)
    assert ids[0] and ids[0] == ids[1] == state["progress"]["run_id"]


@pytest.mark.timeout(180)
def test_resumed_run_logs_each_step_once(tmp_path):
    """Steps re-done after a resume (between the checkpoint and the interruption) are not logged twice."""
    import shutil

    from mlflow.tracking import MlflowClient

    from trainer.loop import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_cfg(str(tmp_path / "run"), "train.steps=6", "train.ckpt_every=3", "train.keep_last=5", "train.log_every=1",
                   "tracking.enabled=true", f"tracking.uri={uri}", "tracking.system_metrics_every=0")
    train(cfg, task=TinyTask(cfg.task, cfg.model), loaders=tiny_loaders(cfg, 0, 1))
    ck = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ck / "step_00000006")  # interrupted after logging step 6, before its checkpoint
    train(cfg, task=TinyTask(cfg.task, cfg.model), loaders=tiny_loaders(cfg, 0, 1))
    run_id = json.loads((tmp_path / "run" / "metrics.json").read_text())["run_id"]
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hydra_entry_point_under_torchrun(tmp_path):
    """`torchrun -m trainer` on real synthetic shards with the depth task, DDP on 2 ranks, MLflow:
    Hydra's folder written once (rank 0), per-rank logs, metrics, weights, system metrics."""
    import sqlite3

    from dist_helpers import build_synthetic, run_torchrun

    data = tmp_path / "syn"
    build_synthetic(data, "--width", "64", "--sequences", "train=1", "val=1", "test=1", "--frames-per-sequence", "4")
    out = tmp_path / "run"
    run_torchrun(["-m", "trainer", "task=depth", "parallel=ddp", f"data.root={data}", f"out_dir={out}",
                  "train.steps=2", "train.batch_size=1", "train.log_every=1", "train.progress=false",
                  f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "tracking.system_metrics_every=0.001"],
                 nproc=2, timeout=280)
    assert (out / ".hydra" / "config.yaml").is_file() and not list(out.glob("*.log"))
    assert "[rank 1/2 node 0]" in (out / "logs" / "rank1.log").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["strategy"] == "ddp" and metrics["run_id"]
    assert metrics["test"]["images"] > 0 and "abs_rel" in metrics["val"]
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert any(k.startswith("depth") or k.startswith("encoder") for k in weights), list(weights)[:5]
    assert list((out / "qualitative").rglob("*.png")), "the depth task's qualitative PNGs"
    keys = {r[0] for r in sqlite3.connect(out / "mlflow.db").execute("select key from metrics")}
    assert {"train/loss", "train/samples_per_s", "val/abs_rel", "test/abs_rel",
            "system/node_0/cpu_utilization_percentage"} <= keys


if __name__ == "__main__":
    worker(sys.argv[1:])
