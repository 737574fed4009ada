"""Evaluation on splits whose frames come in several sizes (issue 32, item 1), at any batch size.

KITTI's Eigen test split holds five capture dates of five frame sizes (375x1242, 370x1224,
374x1238, 370x1226, 376x1241; 522 / 25 / 25 / 75 / 50 frames in file order). A batch across two
dates used to fail in the final test pass ("cannot batch key 'depth'"), after training, before
the weights were exported. Here: the five real sizes with the counts scaled by 1/50 (10/1/1/2/1)
for depth (Monodepth2's protocol: network at a fixed size, ground truth at its own), five small
sizes of the same pattern for segmentation, every batch size giving the per-frame result.
"""
from __future__ import annotations


import pytest
import torch

from data_shards.collate import RAGGED, collate, require_uniform
from frame_sizes import EIGEN_SIZES, SMALL_SIZES, frame_sizes
from trainer.config import ModelConfig
from trainer.evaluation import evaluate, uniform_parts
from trainer.tasks.depth import DepthTask, DepthTaskConfig
from trainer.tasks.segmentation import SegmentationConfig, SegmentationTask


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PlainEngine:
    """The engine verbs ``evaluate`` uses, on one process with a plain model. ``peer_passes``
    stands for a second rank's forward-pass counts (what the all-reduce would bring back)."""

    def __init__(self, model, peer_passes=None):
        self.parts, self.rank, self.is_logging_rank = model, 0, True
        self.world_size = 1 if peer_passes is None else 2
        self.peer_passes, self.forwards = list(peer_passes or []), 0

    def train(self, mode=True):
        self.parts.train(mode)

    def to_device(self, batch):
        return batch

    def forward(self, fn, batch):
        self.forwards += 1
        return fn(self.parts, batch)

    def all_reduce_sum(self, t):
        if t.numel() == self.world_size and self.world_size == 2 and self.peer_passes:
            return t + torch.tensor([0.0, float(self.peer_passes.pop(0))], dtype=t.dtype)
        return t


def _samples(sizes, seg_classes=5):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (h, w) in enumerate(sizes):
        depth = torch.rand(1, h, w, generator=g) * 70 + 2
        depth[:, : h // 3] = 0
        out.append({"__key__": f"f{i:03d}", "__valid__": True,
                    "rgb": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
                    "depth": depth, "seg": torch.randint(0, seg_classes, (h, w), generator=g, dtype=torch.uint8),
                    "meta": {"index": i}})
    return out


def _batches(samples, batch_size):
    return [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def test_collate_keeps_mixed_sizes_as_lists_and_training_refuses_them():
    samples = _samples([(6, 10), (6, 10), (7, 12)])
    same = collate(samples[:2])
    assert RAGGED not in same and same["rgb"].shape == (2, 3, 6, 10) and require_uniform(same) is same
    mixed = collate(samples)
    assert mixed[RAGGED] == ["rgb", "depth", "seg"]
    assert [tuple(t.shape) for t in mixed["rgb"]] == [(3, 6, 10), (3, 6, 10), (3, 7, 12)]
    assert mixed["__valid__"].tolist() == [True] * 3 and mixed["meta"] == [{"index": i} for i in range(3)]
    with pytest.raises(ValueError, match=r"cannot batch key 'rgb' over samples \['f000', 'f001', 'f002'\]: "
                                         r"sizes \[\(3, 6, 10\), \(3, 7, 12\)\] differ; a training batch"):
        require_uniform(mixed)
    samples[2]["rgb"] = samples[2]["rgb"].float()
    with pytest.raises(ValueError, match="cannot batch key 'rgb'.*different rank or dtype"):
        collate(samples)


def test_uniform_parts_group_by_size_in_order_of_first_appearance():
    batch = collate(_samples([(6, 10), (7, 12), (6, 10), (8, 8), (7, 12)]))
    parts = uniform_parts(batch)
    assert [p["__key__"] for p in parts] == [["f000", "f002"], ["f001", "f004"], ["f003"]]
    assert [tuple(p["depth"].shape) for p in parts] == [(2, 1, 6, 10), (2, 1, 7, 12), (1, 1, 8, 8)]
    assert all(RAGGED not in p and p["__valid__"].shape == (len(p["__key__"]),) for p in parts)
    assert torch.equal(parts[1]["rgb"][1], batch["rgb"][4]) and parts[1]["meta"] == [{"index": 1}, {"index": 4}]


def _depth_task(**kw):
    return DepthTask(DepthTaskConfig(supervision="mono", eval_crop="garg", **kw), ModelConfig())


def test_depth_on_the_five_eigen_sizes_at_any_eval_batch_size():
    """Monodepth2's protocol (network at one size, the disparity resized to each frame's own ground
    truth) on the five real sizes: every batch size gives the frame-by-frame result."""
    task = _depth_task(eval_resize=[32, 96])
    torch.manual_seed(0)
    model = task.build_model()
    samples = _samples(frame_sizes())
    assert len(samples) == 15 and len({tuple(s["depth"].shape) for s in samples}) == 5
    by_frame = evaluate(PlainEngine(model), task, _batches(samples, 1))
    assert by_frame["images"] == 15 and 0 < by_frame["abs_rel"] < 5
    for batch_size in (4, 15):
        got = evaluate(PlainEngine(model), task, _batches(samples, batch_size))
        assert got == pytest.approx(by_frame, rel=1e-6, abs=1e-9), batch_size
    # by hand: each frame's prediction at its own ground truth's size
    metric = task.new_metric()
    model.eval()
    with torch.no_grad():
        for s in samples:
            one = collate([s])
            metric.update_image(task.eval_step(model, one)[0, 0], one["depth"][0, 0])
    assert metric.compute(metric.state()) == pytest.approx(by_frame, rel=1e-6, abs=1e-9)


def test_segmentation_on_mixed_sizes_at_any_eval_batch_size():
    task = SegmentationTask(SegmentationConfig(num_classes=5), ModelConfig())
    torch.manual_seed(0)
    model = task.build_model()
    samples = _samples(frame_sizes(SMALL_SIZES))
    by_frame = evaluate(PlainEngine(model), task, _batches(samples, 1))
    assert by_frame["num_pixels"] == sum(h * w for h, w in frame_sizes(SMALL_SIZES))
    for batch_size in (4, 15):
        assert evaluate(PlainEngine(model), task, _batches(samples, batch_size)) == pytest.approx(by_frame), batch_size


def test_ranks_agree_on_the_number_of_forward_passes():
    """A sharded model gathers its parameters in every forward pass: a rank with fewer same-size
    parts than its peer runs throw-away passes (one padding sample, never counted)."""
    task = _depth_task(eval_resize=[32, 96])
    model = task.build_model()
    sizes = [EIGEN_SIZES[0], EIGEN_SIZES[1], EIGEN_SIZES[0], EIGEN_SIZES[0]]
    batches = _batches(_samples(sizes), 2)  # parts: 2, then 1
    alone = evaluate(PlainEngine(model), task, batches)
    engine = PlainEngine(model, peer_passes=[3, 3])  # the peer needs 3 passes for each batch
    with_peer = evaluate(engine, task, batches)
    assert engine.forwards == 6 and with_peer == alone and alone["images"] == 4


# ------------------------------------------------------------------ through the real loop
def _run_cfg(root, out, **task_kw):
    from omegaconf import OmegaConf

    from trainer.config import RunConfig

    cfg = OmegaConf.structured(RunConfig(task=DepthTaskConfig(supervision="supervised", eval_resize=[32, 96],
                                                              eval_crop="garg", **task_kw)))
    cfg.data.root, cfg.out_dir, cfg.data.val_split = str(root), str(out), ""
    cfg.train.steps, cfg.train.batch_size, cfg.train.progress, cfg.train.resume = 1, 4, False, "never"
    cfg.tracking.enabled = False
    return cfg


@pytest.fixture(scope="module")
def eigen_shards(tmp_path_factory):
    """Training frames of one size; the test split of the five Eigen sizes (15 frames, file order)."""
    from frame_sizes import write_frames

    root = tmp_path_factory.mktemp("eigen")
    write_frames(root, "train", [(64, 96)] * 4)
    return write_frames(root, "test", frame_sizes(), start=100)


def test_a_run_evaluates_a_mixed_size_test_split_in_batches_of_four(eigen_shards, tmp_path):
    import json

    from trainer.loop import train

    from trainer.tracking import Tracker

    class Tags(Tracker):
        def __init__(self):
            super().__init__()
            self.tags = {}

        def set_tags(self, tags):
            self.tags.update(tags)

    tracker = Tags()
    result = train(_run_cfg(eigen_shards, tmp_path / "run"), tracker=tracker)
    assert result["test"]["images"] == 15 and result["test"]["images_without_gt"] == 0
    assert tracker.tags == {"init.provenance": "random initialisation (seed 0)"}  # the run says where it started
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"] == result["test"]
    assert (tmp_path / "run" / "weights.pt").is_file()


def test_weights_are_exported_before_the_final_evaluation(eigen_shards, tmp_path):
    """A failure in the final evaluation must not lose the trained model."""
    from trainer.loop import train

    class Broken(DepthTask):
        def new_metric(self):
            raise RuntimeError("evaluation broke")

    cfg = _run_cfg(eigen_shards, tmp_path / "run")
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train(cfg, task=Broken(cfg.task, cfg.model, seed=cfg.seed, parallel=cfg.parallel))
    state = torch.load(tmp_path / "run" / "weights.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in state) and not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_two_fsdp_ranks_evaluate_a_mixed_size_test_split(eigen_shards, tmp_path):
    """Rank 0 reads frames 0-7 (one size), rank 1 frames 8-14 (four sizes) and a padding sample: rank
    1 needs more forward passes per batch, and FSDP2 gathers parameters in each: without agreement
    on the count the ranks would wait for each other for ever (the hard timeout would fail it)."""
    import json

    from dist_helpers import run_torchrun

    out = tmp_path / "run"
    run_torchrun(["-m", "trainer", "task=depth", "task.supervision=supervised", "task.eval_resize=[32,96]",
                  f"data.root={eigen_shards}", "data.val_split=''", "parallel=fsdp", "train.steps=1",
                  "train.batch_size=2", "train.progress=false", "tracking=none", f"out_dir={out}"],
                 nproc=2, timeout=240)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["test"]["images"] == 15
