"""trainer.tasks.visuals: the palette, the inverse-depth colour map and the titled qualitative figures."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from trainer.tasks import visuals as V


def test_label_colors_use_the_cityscapes_palette_and_draw_ignore_black():
    labels = np.array([[0, 7], [18, 255]])
    rgb = V.label_colors(labels)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == (128, 64, 128) and tuple(rgb[0, 1]) == (220, 220, 0)  # road, traffic sign
    assert tuple(rgb[1, 0]) == (119, 11, 32) and tuple(rgb[1, 1]) == (0, 0, 0)


def test_inverse_depth_colors_near_is_bright_and_invalid_not_black():
    depth = np.array([[1.0, 10.0, 5.0]])
    rgb = V.inverse_depth_colors(depth, valid=np.array([[True, True, False]]))
    assert rgb[0, 0].sum() > rgb[0, 1].sum()  # 1 m brighter than 10 m
    assert tuple(rgb[0, 2]) == V.NO_DEPTH_COLOR  # not black: black is "far" on this map


def test_class_legend_names_only_the_classes_shown():
    names = [f"c{i}" for i in range(19)]
    legend = V.class_legend(np.array([[0, 7]]), np.array([13]), names)
    assert [n for n, _ in legend.entries] == ["c0", "c7", "c13"]
    assert legend.entries[1][1] == (220, 220, 0)


def test_figures_are_readable_size_and_written_atomically(tmp_path):
    image = torch.randint(0, 256, (3, 64, 192), dtype=torch.uint8)
    depth = np.linspace(1, 50, 32 * 96).reshape(32, 96)  # at half resolution: resized to the input
    path = V.depth_figure(image, depth, np.zeros((64, 192)), path=tmp_path / "d.png", title="depth: k")
    seg = np.random.default_rng(0).integers(0, 19, (64, 192))
    spath = V.segmentation_figure(image.float() / 255, seg, np.full((64, 192), 255), ["x"] * 19, 255,
                                  path=tmp_path / "s.png")
    for p in (path, spath):
        w, h = Image.open(p).size
        assert w >= 800 and h >= 600, (p, w, h)  # wide frames: one 800-px panel per row
    square = V.flow_figure(torch.zeros(3, 100, 100), np.zeros((100, 100, 3), np.uint8), path=tmp_path / "f.png")
    assert Image.open(square).size[0] >= 1000  # side by side, 500 px a panel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "f.png", "s.png"]  # no temporary left


def test_comparison_chart_adds_a_paired_interval_panel_and_stays_viewer_sized(tmp_path):
    from launch.chart import bar_chart
    from launch.table import build_table
    from launch.runstore import RunRecord
    from launch.study_config import CompareConfig

    runs = [RunRecord(f"{pre}{seed}", "", "FINISHED",
                      {"study_job": f"{pre}-{seed}", "grid_pretraining": pre, "grid_dataset": "d", "grid_protocol": "full",
                       "grid_shots": "0", "grid_seed": str(seed)},
                      {}, {"test/miou": base + 0.01 * seed, "test/pixel_acc": base + 0.3}, seed)
            for pre, base in (("depth", 0.6), ("flow", 0.55), ("classification_other_domain", 0.55), ("random", 0.5))
            for seed in range(3)]
    colors = {"depth": "#1f77b4", "flow": "#ff7f0e", "classification_other_domain": "#2ca02c", "random": "#d62728"}
    sizes = []
    for baselines in ([], ["classification_other_domain", "flow", "random"]):
        table = build_table(runs, CompareConfig(baselines=baselines))
        sizes.append(Image.open(bar_chart(table, tmp_path / f"c{len(baselines)}.png", "t", colors)).size)
    assert sizes[1][1] > 1.8 * sizes[0][1]  # the means panel, then the pairs with their 95 % intervals
    # MLflow's artifact viewer: ~1000 px wide, and the whole chart of 4 rows x 3 baselines in one screen
    assert sizes[1][0] == 1000 and sizes[1][1] < 800, sizes
