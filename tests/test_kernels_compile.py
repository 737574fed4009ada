"""The photometric kernels compile for the GPU (sm_90) in compiled, not interpreted, mode, within
the register file (at most a few spilled bytes); this needs no GPU (Triton's compiler, ptxas and
cuobjdump run anywhere)."""
from __future__ import annotations

import pytest
import torch

from trainer.kernels import aot


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kernels_compile_for_sm90_without_heavy_spills():
    """The heaviest configuration: bf16, Monodepth2's 2 identity + 2 warped sources, gradients to
    the warped sources and the target."""
    infos = aot.compile_kernels(arch=90, dtype=torch.bfloat16, n_sources=4, grad_mask=0b1100,
                                grad_target=True)
    assert [i.name for i in infos] == ["fwd_kernel", "bwd_coef_kernel", "bwd_grad_kernel"]
    for info in infos:
        assert 0 < info.registers <= 255 and info.ptx_lines > 100, info
        # A few bytes of stack are harmless; tens of bytes per thread mean the tile is too big.
        assert info.stack_bytes + info.local_bytes <= 16, info
