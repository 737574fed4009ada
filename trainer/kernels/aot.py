"""Ahead-of-time compilation of the photometric kernels for a CUDA architecture, without a GPU.

Triton's compiler and the bundled ``ptxas`` run on any machine, so CI can check that the kernels
compile in *compiled* (not interpreted) mode — type rules, static branches, tuple arguments —
and report registers and spills per kernel, which is the first thing to look at when choosing
tile sizes before a GPU is available.
"""
from __future__ import annotations

import importlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNEL_MODULE = "trainer.kernels.photometric_triton"

POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
                 torch.float64: "*fp64"}
"""Triton signature strings of the image pointer dtypes the kernels accept."""


@dataclass(frozen=True)
class CompiledInfo:
    """What ptxas reports for one compiled kernel."""

    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    ptx_lines: int


def _signatures(K, dtype: torch.dtype, n_sources: int, grad_mask: int, grad_target: bool):
    """(kernel, signature, constexprs) for the three kernels of module K at one configuration."""
    img = POINTER_TYPES[dtype]
    cdt = K._compute_dtype(dtype)
    acc = "*fp64" if cdt == tl.float64 else "*fp32"
    srcs = (img,) * n_sources
    common = {"N_SRC": n_sources, "C": 3, "CDT": cdt, "BLOCK_H": K.BLOCK_H, "BLOCK_W": K.BLOCK_W}
    ssim = {"C1": K.SSIM_C1, "C2": K.SSIM_C2}
    const = lambda names: {n: "constexpr" for n in names}  # noqa: E731
    fwd = {"tgt_ptr": img, "src_ptrs": srcs, "argmin_ptr": "*u8", "partial_ptr": acc, "H": "i32",
           "W": "i32", "ssim_weight": "fp32", **const([*common, *ssim])}
    coef = {"tgt_ptr": img, "src_ptrs": srcs, "argmin_ptr": "*u8", "coef_ptr": acc,
            "gscale_ptr": acc, "H": "i32", "W": "i32", "ssim_weight": "fp32", "inv_count": "fp32",
            **const([*common, *ssim])}
    gsrc = tuple(img if (grad_mask >> i) & 1 else acc for i in range(n_sources))
    grad = {"tgt_ptr": img, "src_ptrs": srcs, "argmin_ptr": "*u8", "coef_ptr": acc,
            "gscale_ptr": acc, "gtgt_ptr": img if grad_target else acc, "gsrc_ptrs": gsrc,
            "H": "i32", "W": "i32", "ssim_weight": "fp32", "inv_count": "fp32",
            **const([*common, "GRAD_MASK", "GRAD_TGT"])}
    return [
        (K._fwd_kernel, fwd, {**common, **ssim}),
        (K._bwd_coef_kernel, coef, {**common, **ssim}),
        (K._bwd_grad_kernel, grad, {**common, "GRAD_MASK": grad_mask, "GRAD_TGT": grad_target}),
    ]


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", str(path), "-o",
                              str(Path(tmp) / "kernel.cubin")],
                             capture_output=True, text=True, check=True, timeout=300)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{text}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_kernels(arch: int = 90, dtype: torch.dtype = torch.float32, n_sources: int = 4,
                    grad_mask: int = 0b1100, grad_target: bool = False) -> list[CompiledInfo]:
    """Compile the forward and both backward kernels for ``sm_<arch>`` (e.g. 80 A100, 90 H100)
    and return ptxas's register / spill report for each. Raises if any kernel fails to compile.
    The default is Monodepth2's case: 2 identity + 2 warped sources, gradients to the warped."""
    K = importlib.import_module(KERNEL_MODULE)
    if K.INTERPRETED:
        raise RuntimeError("the kernel module was imported under TRITON_INTERPRET=1; compile in a "
                           "process without it")
    infos = []
    for fn, signature, constexprs in _signatures(K, dtype, n_sources, grad_mask, grad_target):
        compiled = triton.compile(ASTSource(fn, signature, constexprs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": K.NUM_WARPS})
        ptx = compiled.asm["ptx"]
        regs, stores, loads = _ptxas_report(ptx, arch)
        infos.append(CompiledInfo(fn.__name__, regs, stores, loads, ptx.count("\n")))
    return infos
