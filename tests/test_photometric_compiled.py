"""The CPU photometric loss compiled by inductor (``impl="compiled"``, what ``auto`` takes on a CPU
with a C++ compiler): the same values, argmin and gradients as the hand-written eager path, and
clear behaviour where compiling is impossible (no compiler) or fails (warn + eager under auto,
an error when asked for explicitly)."""
from __future__ import annotations

import pytest
import torch

from trainer.geometry import pad_image
from trainer.kernels import compiled_cpu, dispatch
from trainer.kernels.photometric_cpu import PAD
from trainer.kernels.dispatch import fused_reprojection_loss, multiscale_reprojection_loss
from trainer.losses.photometric import min_reprojection

B, S, H, W = 3, 2, 10, 14  # B odd: the last 2-image chunk holds one image (a second compiled shape)


@pytest.fixture(autouse=True)
def _two_image_chunks(monkeypatch):
    """Chunks of 2 images at H x W (the CPU path sizes its chunks by pixels)."""
    monkeypatch.setattr("trainer.kernels.photometric_cpu.CHUNK_PIXELS", 2 * H * W)


def _inputs(seed: int = 0):
    """Target, identity sources and the warps (B, C, S, H, W) as leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(B, 3, H, W, generator=g)
    identity = [(target + 0.2 * torch.randn(B, 3, H, W, generator=g)).clamp(0, 1) for _ in range(2)]
    warped = [(target.unsqueeze(2) + 0.2 * torch.randn(B, 3, S, H, W, generator=g)).clamp(0, 1)
              .requires_grad_(True) for _ in range(2)]
    return target, identity, warped


def _loss_and_grads(impl: str, seed: int = 0):
    target, identity, warped = _inputs(seed)
    losses, argmin = multiscale_reprojection_loss(target, [pad_image(w, PAD) for w in warped], identity, 0.85,
                                                  impl)
    grads = torch.autograd.grad(losses.sum(), warped)
    return losses, argmin, grads


@pytest.mark.skipif(not compiled_cpu.available(), reason="no C++ compiler for inductor")
def test_compiled_matches_handwritten_values_argmin_and_gradients():
    assert dispatch.resolve_multiscale_impl("auto", torch.zeros(1)) == "compiled"
    ref_losses, ref_argmin, ref_grads = _loss_and_grads("handwritten")
    for impl in ("compiled", "auto"):
        losses, argmin, grads = _loss_and_grads(impl)
        torch.testing.assert_close(losses, ref_losses, rtol=1e-6, atol=1e-7)
        assert torch.equal(argmin, ref_argmin)
        assert 0 < (argmin >= 2).float().mean() < 1  # identity and warped sources both win somewhere
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-8)
            assert g.abs().sum() > 0


@pytest.mark.skipif(not compiled_cpu.available(), reason="no C++ compiler for inductor")
@pytest.mark.parametrize("impl", ["handwritten", "compiled"])
def test_one_scale_entry_takes_the_cpu_paths(impl):
    target, identity, warped = _inputs(1)
    ws = [w[:, :, 0].detach() for w in warped]
    loss, argmin = fused_reprojection_loss(target, ws, identity, impl=impl, return_argmin=True)
    best, index, _ = min_reprojection(target, ws, identity)
    torch.testing.assert_close(loss, best.mean(), rtol=1e-6, atol=1e-7)
    assert torch.equal(argmin, index)


def test_without_a_compiler_auto_is_handwritten_and_compiled_is_refused(monkeypatch):
    monkeypatch.setattr(compiled_cpu, "available", lambda: False)
    target = torch.zeros(1, 3, 4, 4)
    assert dispatch.resolve_multiscale_impl("auto", target) == "handwritten"
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler .* use impl='handwritten'"):
        dispatch.resolve_multiscale_impl("compiled", target)
    ref = _loss_and_grads("handwritten")
    got = _loss_and_grads("auto")
    assert torch.equal(got[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(got[2], ref[2]))


class _Broken:
    """Stands in for a torch.compile'd function whose compilation fails."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args):
        raise RuntimeError("InductorError: g++ exited with status 1")


def test_a_failed_compilation_warns_and_runs_eagerly_under_auto_and_raises_when_asked(monkeypatch):
    monkeypatch.setattr(compiled_cpu, "available", lambda: True)
    monkeypatch.setattr(compiled_cpu.torch, "compile", _Broken)
    # a fresh process's bookkeeping: in a long suite earlier tests may have used up MAX_VARIANTS
    # signatures of these functions, and further signatures then run eagerly without compiling
    monkeypatch.setattr(compiled_cpu, "_COMPILED", {})
    monkeypatch.setattr(compiled_cpu, "_EAGER", set())
    compiled_cpu.chunk_functions.cache_clear()
    try:
        ref = _loss_and_grads("handwritten")
        with pytest.warns(RuntimeWarning, match=r"torch.compile of \w+ failed .*g\+\+ exited"):
            got = _loss_and_grads("auto")
        assert torch.equal(got[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(got[2], ref[2]))
        with pytest.raises(compiled_cpu.CompileFailed, match="impl 'compiled'.*use impl='handwritten'"):
            _loss_and_grads("compiled")
    finally:
        compiled_cpu.chunk_functions.cache_clear()


def test_depth_config_names_the_new_impls():
    from trainer.tasks.depth import DepthTask, DepthTaskConfig
    from trainer.config import ModelConfig

    for impl in ("handwritten", "compiled"):
        DepthTask(DepthTaskConfig(photometric_impl=impl), ModelConfig())
    with pytest.raises(ValueError, match="task.photometric_impl='fast'.*auto, triton, reference, handwritten, compiled"):
        DepthTask(DepthTaskConfig(photometric_impl="fast"), ModelConfig())


@pytest.mark.skipif(not compiled_cpu.available(), reason="no C++ compiler for inductor")
def test_signatures_beyond_the_limit_run_eagerly_instead_of_failing(monkeypatch):
    """Dynamo fails hard after 8 compilations of one function under fullgraph (a long-lived
    process seeing many shapes, e.g. this test suite): past MAX_VARIANTS new signatures run eagerly."""
    monkeypatch.setattr(compiled_cpu, "MAX_VARIANTS", 0)
    ref = _loss_and_grads("handwritten", seed=3)
    got = _loss_and_grads("compiled", seed=3)  # strict: would raise if it tried and failed
    assert torch.equal(got[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(got[2], ref[2]))


@pytest.mark.skipif(not compiled_cpu.available(), reason="no C++ compiler for inductor")
def test_compiled_warp_projection_matches_eager_values_and_gradients():
    """The warp's projection and its hand-written gradient, compiled (what the depth task runs on a
    CPU under impl auto, from the network's disparities): the same warp, disparity and pose
    gradients as the eager functions."""
    from trainer.geometry import pose_vec_to_mat, warp_scales

    g = torch.Generator().manual_seed(7)
    K = torch.tensor([[0.58 * W, 0, W / 2], [0, 1.92 * H, H / 2], [0, 0, 1]]).repeat(B, 1, 1)
    aa, tr = 0.05 * torch.randn(B, 3, generator=g), 0.3 * torch.randn(B, 3, generator=g)
    img, disps = torch.rand(B, 3, H, W, generator=g), 0.01 + 0.3 * torch.rand(B, S, H, W, generator=g)
    upstream = torch.randn(B, 3, S, H + 2 * PAD, W + 2 * PAD, generator=g)
    results = []
    for fns in (None, dispatch.depth_functions("compiled", img).grid):
        d, a = disps.clone().requires_grad_(True), aa.clone().requires_grad_(True)
        out = warp_scales(img, d, pose_vec_to_mat(a, tr), K, pad=PAD, grid_fns=fns, disp_range=(1 / 100, 1 / 0.1))
        results.append((out, *torch.autograd.grad((out * upstream).sum(), [d, a])))
    assert dispatch.depth_functions("handwritten", img).grid is None
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        assert ref.abs().sum() > 0


@pytest.mark.skipif(not compiled_cpu.available(), reason="no C++ compiler for inductor")
def test_compiled_smoothness_matches_eager_values_and_gradients():
    from trainer.losses.smoothness import multiscale_smoothness

    g = torch.Generator().manual_seed(8)
    image = torch.rand(B, 3, 16, 24, generator=g)
    disps = [torch.rand(B, 1, 16 >> s, 24 >> s, generator=g) for s in range(3)]
    fns = dispatch.depth_functions("compiled", image)
    assert dispatch.depth_functions("handwritten", image).smoothness is multiscale_smoothness
    results = []
    for fn in (multiscale_smoothness, fns.smoothness):
        ds = [d.clone().requires_grad_(True) for d in disps]
        value = fn(ds, image, (0, 1, 2))
        results.append((value, *torch.autograd.grad(value, ds)))
    for got, ref in zip(*reversed(results)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)
        assert ref.abs().sum() > 0


def test_cpu_chunks_are_sized_by_pixels():
    """Powers of two within CHUNK_PIXELS, at least one image (the fixture: 2 images at H x W)."""
    from trainer.kernels.photometric_cpu import cpu_chunk

    assert cpu_chunk(H, W) == 2 and cpu_chunk(H, W // 2) == 4 and cpu_chunk(4 * H, W) == 1
