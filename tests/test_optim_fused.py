"""trainer.optim's fused Adam(W): the same update as torch's fused kernel, without copying the
gradients of channels_last weights."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from trainer.optim import FusedAdam, FusedAdamW, build_optimizer, memory_order


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                        nn.Conv2d(4, 5, 3), nn.Flatten(), nn.LazyLinear(2))
    net(torch.rand(2, 3, 9, 11))  # materialise the lazy layer
    return net.to(memory_format=torch.channels_last)


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(4, 3, 9, 11, generator=g).contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        net(x).square().sum().backward()
        opt.step()


def _cfg(name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, fused=True)


@pytest.mark.parametrize("name, ours, theirs", [("adam", FusedAdam, torch.optim.Adam),
                                                 ("adamw", FusedAdamW, torch.optim.AdamW)])
def test_same_update_as_torch_fused(name, ours, theirs):
    """Parameters and moments bit-equal to torch's own fused Adam(W) after a few steps, channels_last kept."""
    a, b = _model(), _model()
    opt_a = build_optimizer(a.parameters(), _cfg(name))
    assert type(opt_a) is ours and isinstance(opt_a, theirs)
    opt_b = theirs(b.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    _train(a, opt_a)
    _train(b, opt_b)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
        assert pa.stride() == pb.stride(), n
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key]), (n, key)
    assert opt_a.state_dict()["state"].keys() == opt_b.state_dict()["state"].keys()


def test_close_to_unfused_adam():
    """The fused update is Adam's: within fp32 rounding of torch's per-tensor (foreach) Adam."""
    a = _model()
    b = copy.deepcopy(a)
    _train(a, build_optimizer(a.parameters(), _cfg("adam")))
    _train(b, torch.optim.Adam(b.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=True))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)  # lr 1e-2: 1e-3 of a step


def _copies_in_step(opt_cls) -> int:
    net = _model()
    opt = opt_cls(net.parameters(), lr=1e-3, fused=True)
    _train(net, opt, steps=1)  # state exists
    net(torch.rand(2, 3, 9, 11).contiguous(memory_format=torch.channels_last)).sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return sum(1 for e in prof.events()
               if e.name == "aten::clone" and any(p.name == "aten::_fused_adam_" for p in _ancestors(e)))


def _ancestors(e):
    e = e.cpu_parent
    while e is not None:
        yield e
        e = e.cpu_parent


def test_no_gradient_copies():
    """torch's kernel copies the gradient of every channels_last weight; ours copies none."""
    assert _copies_in_step(torch.optim.Adam) > 0  # the cost this class exists to avoid
    assert _copies_in_step(FusedAdam) == 0


def test_memory_order():
    w = torch.empty(8, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    assert memory_order(w) == (0, 2, 3, 1) and w.permute(0, 2, 3, 1).is_contiguous()
    assert memory_order(torch.empty(8, 3, 5, 5)) is None
    assert memory_order(torch.empty(8, 6)[:, ::2]) is None  # not dense: left as it is
