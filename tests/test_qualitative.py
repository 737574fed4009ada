"""The qualitative pictures a run logs (issue 30, item 6): samples spread over the whole split, not
four neighbouring frames of its first sequence; depth pixels without a measurement in a colour the
magma map does not use (black means "far" there), flow's likewise."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from data_shards.collate import collate
from data_shards.palette import NO_DEPTH_COLOR, NO_FLOW_COLOR, colormap, flow_to_color, inverse_depth_colors
from test_mixed_size_eval import PlainEngine
from trainer.tasks import visuals as V
from trainer.evaluation import evaluate, picture_positions


def test_picture_positions_spread_over_the_split():
    # 68 batches of 4 (the demo's 270 test frames): one picture from each quarter of the split
    assert picture_positions(68, 4, 4) == {0: [0], 17: [0], 34: [0], 51: [0]}
    assert picture_positions(3, 4, 4) == {0: [0, 3], 1: [2], 2: [1]}
    assert picture_positions(1, 8, 4) == {0: [0, 2, 4, 6]}  # one batch: spread within it
    assert picture_positions(1, 2, 4) == {0: [0, 1]}  # fewer samples than pictures: each once


class _Metric:
    def update(self, batch, outputs):
        pass

    def state(self):
        return torch.zeros(1)

    def compute(self, state):
        return {"x": 0.0}


class _Task:
    """What ``evaluate`` needs of a task; ``visualize`` records the keys it was given."""

    def __init__(self):
        self.cfg = SimpleNamespace(vis_samples=4)
        self.drawn: list[str] = []

    def new_metric(self):
        return _Metric()

    def eval_step(self, model, batch):
        return {"pred": batch["x"] * 2}

    def visualize(self, model, batch, outputs, out_dir):
        assert torch.equal(outputs["pred"], batch["x"] * 2)  # the outputs of the very samples drawn
        self.drawn += batch["__key__"]

    def on_train_mode(self, model):
        pass


def test_evaluation_draws_samples_spread_over_every_batch(tmp_path):
    samples = [{"__key__": f"f{i:03d}", "__valid__": True, "x": torch.full((2,), float(i))} for i in range(80)]
    batches = [collate(samples[i:i + 4]) for i in range(0, 80, 4)]
    task = _Task()
    evaluate(PlainEngine(torch.nn.Identity()), task, iter(batches), visualize_to=tmp_path, num_batches=20)
    assert task.drawn == ["f000", "f020", "f040", "f060"]
    task = _Task()  # length unknown (a plain iterator): the first batch, as before
    evaluate(PlainEngine(torch.nn.Identity()), task, iter(batches), visualize_to=tmp_path)
    assert task.drawn == ["f000", "f001", "f002", "f003"]


def test_no_measurement_colours_are_not_colours_of_their_maps():
    magma = colormap(np.linspace(0, 1, 1024)).astype(float)
    assert np.sqrt(((magma - NO_DEPTH_COLOR) ** 2).sum(1)).min() > 150  # far from every magma colour
    depth = np.array([[1.0, 80.0, 0.0]])
    rgb = inverse_depth_colors(depth, depth > 0)
    assert tuple(rgb[0, 2]) == NO_DEPTH_COLOR and rgb[0, 1].sum() < 60  # far is dark, missing is teal
    flow = np.zeros((2, 1, 3))
    flow[0, 0, 1] = 3.0
    frgb = flow_to_color(flow, valid=np.array([[True, True, False]]))
    assert tuple(frgb[0, 0]) == (0, 0, 0) and tuple(frgb[0, 2]) == NO_FLOW_COLOR  # no motion vs no measurement


def test_depth_figure_shows_missing_ground_truth_in_its_colour(tmp_path):
    image = torch.randint(0, 256, (3, 64, 192), dtype=torch.uint8)
    gt = np.full((64, 192), 20.0)
    gt[:20] = 0.0  # the top rows have no measurement
    path = V.depth_figure(image, np.full((64, 192), 10.0), gt, path=tmp_path / "d.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    teal = (np.abs(pixels.astype(int) - NO_DEPTH_COLOR).sum(1) < 6).sum()
    assert teal > 20 * 192  # the missing rows, scaled up, plus the legend patch
