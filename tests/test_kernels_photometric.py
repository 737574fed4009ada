"""Fused Triton photometric loss vs the reference (trainer.losses.photometric), on CPU tensors
under the Triton interpreter: forward value, argmin (auto-mask) and gradients, across odd sizes,
tile borders, image edges, ties, dtypes; plus gradcheck in float64 and the dispatch's errors.

TRITON_INTERPRET=1 is set only while the kernel module is imported (Triton fixes interpreted vs
compiled when the @triton.jit decorators run), and the module is dropped from sys.modules again
afterwards, so nothing leaks into other test modules in the same pytest process.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from trainer.kernels import dispatch
from trainer.kernels.dispatch import fused_reprojection_loss
from trainer.losses.photometric import min_reprojection, reprojection_loss

MODULE = dispatch.KERNEL_MODULE
ENV_AT_IMPORT = os.environ.get("TRITON_INTERPRET")


def _import_kernels(interpret: bool):
    """Import a fresh copy of the kernel module with TRITON_INTERPRET set (or unset) during the
    import only; returns (module, previous sys.modules entry)."""
    previous = sys.modules.pop(MODULE, None)
    saved = os.environ.get("TRITON_INTERPRET")
    try:
        if interpret:
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            os.environ.pop("TRITON_INTERPRET", None)
        module = importlib.import_module(MODULE)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module, previous


def _restore(previous) -> None:
    """Put back the module (or its absence) in sys.modules and as the package attribute, which
    ``from trainer.kernels import photometric_triton`` would otherwise still find."""
    import trainer.kernels as package

    sys.modules.pop(MODULE, None)
    if previous is not None:
        sys.modules[MODULE] = previous
        package.photometric_triton = previous
    elif hasattr(package, "photometric_triton"):
        delattr(package, "photometric_triton")


@pytest.fixture(scope="module")
def kernels():
    """The kernel module, defined under the Triton interpreter (runs on CPU tensors)."""
    module, previous = _import_kernels(interpret=True)
    assert module.INTERPRETED
    yield module
    _restore(previous)


def _images(shape, n, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
            for _ in range(n)]


def _both(target, warped, identity, ssim_weight=0.85):
    """(loss, argmin, grads) from the fused kernels and from the reference, for every input
    that requires grad (target, identity..., warped...)."""
    inputs = [t for t in [target, *identity, *warped] if t.requires_grad]
    loss, argmin = fused_reprojection_loss(target, warped, identity, ssim_weight, impl="triton",
                                           return_argmin=True)
    grads = torch.autograd.grad(loss, inputs) if inputs else ()
    best, index, _ = min_reprojection(target, warped, identity or None, ssim_weight)
    ref_loss = best.mean()
    ref_grads = torch.autograd.grad(ref_loss, inputs) if inputs else ()
    return (loss, argmin, grads), (ref_loss, index, ref_grads)


@pytest.mark.parametrize("B,H,W,n_warp,n_id,id_grad", [
    (1, 7, 9, 1, 0, False),     # odd size, one source, no auto-masking
    (2, 13, 17, 2, 2, False),   # Monodepth2's case: 2 warped + 2 identity
    (1, 9, 33, 3, 1, True),     # crosses the 8x32 tile border in both directions; identity grads
    (3, 2, 3, 2, 1, False),     # smallest image reflection padding allows (every pixel is an edge)
])
def test_fp32_matches_reference(kernels, B, H, W, n_warp, n_id, id_grad):
    shape = (B, 3, H, W)
    target = _images(shape, 1, seed=1, grad=True)[0]
    warped = _images(shape, n_warp, seed=2, grad=True)
    identity = _images(shape, n_id, seed=3, grad=id_grad)
    (loss, argmin, grads), (ref_loss, ref_index, ref_grads) = _both(target, warped, identity)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert argmin.shape == (B, 1, H, W) and argmin.dtype == torch.int64
    assert torch.equal(argmin, ref_index)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert len(grads) == 1 + n_warp + (n_id if id_grad else 0)
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == rg.dtype and g.shape == rg.shape
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-9)
    # Some candidate other than the first must win somewhere, or the argmin check is vacuous.
    if n_warp + n_id > 1:
        assert 0 < (ref_index > 0).sum() < ref_index.numel()


def test_ties_go_to_the_lowest_index_and_identity_wins(kernels):
    """Warped 0 equals identity 1 exactly, warped 1 equals the target: the equal errors tie
    bit-for-bit and must resolve exactly like the reference (lowest index)."""
    shape = (2, 3, 5, 6)
    target = _images(shape, 1, seed=4, grad=True)[0]
    id0, id1 = _images(shape, 2, seed=5)
    w0 = id1.detach().clone().requires_grad_(True)
    w1 = target.detach().clone().requires_grad_(True)
    identity, warped = [id0, id1, w1.detach().clone()], [w0, w1]
    (loss, argmin, grads), (ref_loss, ref_index, ref_grads) = _both(target, warped, identity)
    assert torch.equal(argmin, ref_index)
    # The identity copy of the target (index 2, error 0) beats its warped twin (index 4) everywhere.
    assert (argmin == 2).all()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-7)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-9)
    # Nothing flows into warped sources that never won.
    assert grads[1].abs().max() == 0 and grads[2].abs().max() == 0


def test_partial_ties_between_identity_and_warped(kernels):
    """Identity 0 and warped 0 are equal in the left half only: there the identity wins the tie."""
    shape = (1, 3, 6, 8)
    target, id0, other = _images(shape, 3, seed=6)
    w0 = other.clone()
    w0[..., :4] = id0[..., :4]
    w0.requires_grad_(True)
    (loss, argmin, grads), (ref_loss, ref_index, ref_grads) = _both(target, [w0], [id0])
    assert torch.equal(argmin, ref_index)
    assert (argmin[..., :3] == 0).all()  # columns whose whole window lies in the equal half
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-4, atol=1e-9)


def test_ssim_weight_and_non_contiguous_inputs(kernels):
    """Another SSIM weight, and channels_last / sliced inputs (made contiguous on the way in)."""
    shape = (2, 3, 7, 10)
    target = _images(shape, 1, seed=7)[0].to(memory_format=torch.channels_last)
    target.requires_grad_(True)
    wide = _images((2, 3, 7, 20), 1, seed=8)[0]
    warped = [wide[..., ::2].detach().requires_grad_(True)]
    assert not warped[0].is_contiguous()
    identity = _images(shape, 1, seed=9)
    (loss, argmin, grads), (ref_loss, ref_index, ref_grads) = _both(target, warped, identity, 0.5)
    assert torch.equal(argmin, ref_index)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-9)


def test_bf16_accumulates_in_fp32(kernels):
    """bf16 inputs: the kernels load bf16 and compute in fp32, so they match the reference run
    on the same values upcast to fp32 (loss tightly; gradients up to their bf16 rounding, 2**-7
    relative under the interpreter, which truncates), and
    the bf16 reference (which computes in bf16) only to about 1e-2."""
    shape = (2, 3, 7, 9)
    target = _images(shape, 1, dtype=torch.bfloat16, seed=10, grad=True)[0]
    warped = _images(shape, 2, dtype=torch.bfloat16, seed=11, grad=True)
    identity = _images(shape, 1, dtype=torch.bfloat16, seed=12)
    loss, argmin = fused_reprojection_loss(target, warped, identity, impl="triton",
                                           return_argmin=True)
    grads = torch.autograd.grad(loss, [target, *warped])
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)

    up = [t.detach().float().requires_grad_(True) for t in [target, *warped]]
    best, index, _ = min_reprojection(up[0], up[1:], [identity[0].float()])
    ref_grads = torch.autograd.grad(best.mean(), up)
    assert torch.equal(argmin, index)
    torch.testing.assert_close(loss, best.mean(), rtol=1e-6, atol=1e-7)
    for g, rg in zip(grads, ref_grads):
        # bf16 keeps 8 significant bits. The interpreter truncates fp32 -> bf16 (the GPU rounds to
        # nearest), so the relative error of the stored gradient is below 2**-7 here.
        torch.testing.assert_close(g.float(), rg, rtol=2 ** -7, atol=1e-9)

    bf16_ref = reprojection_loss(target, warped, identity)
    assert bf16_ref.dtype == torch.bfloat16
    torch.testing.assert_close(loss, bf16_ref.float(), rtol=1e-2, atol=1e-3)


def test_gradcheck_float64(kernels):
    """Analytic gradients of the fused backward against finite differences, in float64 (the
    kernels compute in fp64 for fp64 inputs; the interpreter supports it)."""
    shape = (1, 3, 4, 5)
    target = _images(shape, 1, dtype=torch.float64, seed=13, grad=True)[0]
    warped = _images(shape, 2, dtype=torch.float64, seed=14, grad=True)
    # The identity source is close to the target on the left, so it wins there.
    identity = _images(shape, 1, dtype=torch.float64, seed=15)
    identity[0][..., :2] = 0.9 * target.detach()[..., :2] + 0.1 * identity[0][..., :2]
    _, index, _ = min_reprojection(target, warped, identity)
    assert len(index.unique()) == 3  # every candidate wins somewhere

    def fn(t, w0, w1):
        return fused_reprojection_loss(t, [w0, w1], identity, impl="triton")

    assert fn(target, *warped).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (target, *warped), eps=1e-6, atol=1e-8, rtol=1e-5,
                                    fast_mode=True)


def test_mixed_dtypes_promote(kernels):
    """A bf16 target with fp32 warped sources computes as fp32, like the reference would."""
    shape = (1, 3, 4, 6)
    target, i0 = _images(shape, 2, dtype=torch.bfloat16, seed=22)
    w0 = _images(shape, 1, seed=23, grad=True)[0]
    loss = fused_reprojection_loss(target, [w0], [i0], impl="triton")
    (grad,) = torch.autograd.grad(loss, [w0])
    ref_w0 = w0.detach().requires_grad_(True)
    ref = reprojection_loss(target.float(), [ref_w0], [i0.float()])
    (ref_grad,) = torch.autograd.grad(ref, [ref_w0])
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-9)


def test_no_grad_and_gradient_only_to_target(kernels):
    shape = (1, 3, 5, 5)
    target, w0, i0 = _images(shape, 3, seed=16)
    with torch.no_grad():
        loss = fused_reprojection_loss(target, [w0], [i0], impl="triton")
    torch.testing.assert_close(loss, reprojection_loss(target, [w0], [i0]), rtol=1e-6, atol=1e-7)
    target.requires_grad_(True)
    (loss, _, grads), (_, _, ref_grads) = _both(target, [w0], [i0])
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-4, atol=1e-9)


def test_double_backward_is_refused(kernels):
    """The fused backward is not differentiable: second derivatives raise, never come out as 0."""
    target, w0 = _images((1, 3, 3, 3), 2, seed=24)
    w0.requires_grad_(True)
    loss = fused_reprojection_loss(target, [w0], impl="triton")
    (grad,) = torch.autograd.grad(loss, [w0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


def test_auto_and_reference_on_cpu_use_the_reference():
    shape = (2, 3, 6, 7)
    target, w0, w1, i0 = _images(shape, 4, seed=17)
    ref = reprojection_loss(target, [w0, w1], [i0])
    for impl in ("auto", "reference"):
        assert dispatch.resolve_impl(impl, target) == "reference"
        assert torch.equal(fused_reprojection_loss(target, [w0, w1], [i0], impl=impl), ref)
    loss, argmin = fused_reprojection_loss(target, [w0, w1], None, impl="auto", return_argmin=True)
    best, index, _ = min_reprojection(target, [w0, w1], None)
    assert torch.equal(loss, best.mean()) and torch.equal(argmin, index)


def test_bad_input_gives_clear_errors():
    shape = (1, 3, 4, 4)
    target, w0 = _images(shape, 2, seed=18)
    with pytest.raises(ValueError, match="'fused' is not one of auto, triton, reference"):
        fused_reprojection_loss(target, [w0], impl="fused")
    with pytest.raises(ValueError, match=r"warped\[1\]: expected shape \(1, 3, 4, 4\)"):
        fused_reprojection_loss(target, [w0, w0[..., :3]])
    with pytest.raises(ValueError, match=r"identity\[0\]: device meta differs from the target"):
        fused_reprojection_loss(target, [w0], [w0.to("meta")])
    with pytest.raises(ValueError, match="at least one warped"):
        fused_reprojection_loss(target, [], [w0])
    with pytest.raises(ValueError, match="H, W >= 2"):
        fused_reprojection_loss(target[..., :1], [w0[..., :1]])
    with pytest.raises(ValueError, match="not a floating image dtype"):
        fused_reprojection_loss((target * 255).to(torch.uint8), [(w0 * 255).to(torch.uint8)])


def test_too_many_sources_for_the_uint8_argmin(kernels):
    target, w0 = _images((1, 3, 2, 2), 2, seed=19)
    with pytest.raises(ValueError, match="256 sources exceed the kernel's maximum of 255"):
        fused_reprojection_loss(target, [w0] * 256, impl="triton")


def test_triton_on_cpu_without_interpreter_is_refused():
    """Kernels defined without TRITON_INTERPRET cannot take CPU tensors: a clear error, not a
    crash inside Triton."""
    module, previous = _import_kernels(interpret=False)
    try:
        assert not module.INTERPRETED
        target, w0 = _images((1, 3, 4, 4), 2, seed=20)
        with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before"):
            fused_reprojection_loss(target, [w0], impl="triton")
    finally:
        _restore(previous)
    assert os.environ.get("TRITON_INTERPRET") == ENV_AT_IMPORT  # nothing leaked


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    """On a GPU, 'auto' takes the compiled kernels; compare with the fp32 reference at a
    KITTI-like size (run by the gpu marker only)."""
    shape = (2, 3, 96, 320)
    cpu = _images(shape, 4, seed=21)
    target, w0, w1, i0 = [t.cuda().to(dtype).requires_grad_(True) for t in cpu]
    assert dispatch.resolve_impl("auto", target) == "triton"
    loss, argmin = fused_reprojection_loss(target, [w0, w1], [i0.detach()], return_argmin=True)
    grads = torch.autograd.grad(loss, [target, w0, w1])
    up = [t.detach().float().requires_grad_(True) for t in (target, w0, w1)]
    best, index, _ = min_reprojection(up[0], up[1:], [i0.detach().float()])
    ref_grads = torch.autograd.grad(best.mean(), up)
    torch.testing.assert_close(loss, best.mean(), rtol=1e-5, atol=1e-6)
    assert (argmin == index).float().mean() > 0.999  # GPU fp32 rounding may flip near-ties
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), rg, rtol=2 ** -7, atol=1e-8)
