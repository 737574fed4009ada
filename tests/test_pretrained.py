"""Strict initialisation loading: reports what it did, fails on any mismatch unless told."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.models.pretrained import PretrainedMismatchError, load_pretrained, read_state_dict


def _net(out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, out, 1))


def _export(tmp_path, extra: dict | None = None):
    src = _net()
    state = {f"encoder.{k}": v for k, v in src.state_dict().items()}
    state.update(extra or {})
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    return src, path


def test_take_prefix_loads_exactly_and_reports_unused(tmp_path):
    src, path = _export(tmp_path, {"depth_decoder.w": torch.ones(2)})
    dst = _net()
    report = load_pretrained(dst, read_state_dict(path), take="encoder.", source=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert report.unused == ["depth_decoder.w"] and len(report.loaded) == len(src.state_dict())
    assert "1 file tensors outside" in report.summary()


def test_missing_unexpected_and_shape_errors_name_keys(tmp_path):
    _, path = _export(tmp_path, {"encoder.extra.weight": torch.ones(1)})
    state = read_state_dict(path)
    with pytest.raises(PretrainedMismatchError, match=r"unexpected in file \(1\): extra.weight"):
        load_pretrained(_net(), state, take="encoder.")
    del state["encoder.extra.weight"]
    del state["encoder.1.running_var"]
    with pytest.raises(PretrainedMismatchError, match=r"missing in file \(1\): 1.running_var"):
        load_pretrained(_net(), state, take="encoder.")
    with pytest.raises(PretrainedMismatchError, match=r"2.weight: file \(3, 4, 1, 1\) vs model \(5, 4, 1, 1\)"):
        load_pretrained(_net(out=5), read_state_dict(path.parent / "weights.pt") | {}, take="encoder.",
                        drop=["encoder.extra."])


def test_drop_and_keep_init_make_a_partial_load_explicit(tmp_path):
    _, path = _export(tmp_path)
    dst = _net(out=5)
    before = dst[2].weight.clone()
    report = load_pretrained(dst, read_state_dict(path), take="encoder.", drop=["encoder.2."], keep_init=["2."])
    assert report.dropped == ["encoder.2.weight", "encoder.2.bias"]
    assert report.kept_init == ["2.weight", "2.bias"]
    assert torch.equal(dst[2].weight, before)  # left at initialisation, on request
    # dropping without saying the model keys stay at init is still an error
    with pytest.raises(PretrainedMismatchError, match="missing in file"):
        load_pretrained(_net(out=5), read_state_dict(path), take="encoder.", drop=["encoder.2."])


def test_rename_and_wrong_prefix(tmp_path):
    src, path = _export(tmp_path)
    dst = nn.ModuleDict({"body": _net()})
    load_pretrained(dst, read_state_dict(path), take="encoder.", rename={"": "body."})
    assert torch.equal(dst["body"][0].weight, src[0].weight)
    with pytest.raises(PretrainedMismatchError, match=r"no tensor under prefix 'backbone.'.*'encoder.'"):
        load_pretrained(_net(), read_state_dict(path), take="backbone.")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(PretrainedMismatchError, match="plain state_dict"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"x": nn.Linear(1, 1)}, tmp_path / "pickled.pt")  # a module needs full unpickling
    with pytest.raises(PretrainedMismatchError, match="weights_only=True"):
        read_state_dict(tmp_path / "pickled.pt")
