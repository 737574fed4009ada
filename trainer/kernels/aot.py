"""Ahead-of-time compilation of the photometric kernels for a CUDA architecture, without a GPU.

Triton's compiler, the bundled ``ptxas`` and ``cuobjdump`` run on any machine, so CI can check
that the kernels compile in *compiled* (not interpreted) mode (type rules, static branches, tuple
arguments) and report registers and spill (stack/local) bytes per kernel, the first thing to
look at when choosing tile sizes before a GPU is available.
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
    """Resource usage of one compiled kernel, as ``cuobjdump --dump-resource-usage`` reports it
    for the cubin Triton built (STACK/LOCAL bytes > 0 mean register spills)."""

    name: str
    registers: int
    stack_bytes: int
    local_bytes: int
    ptx_lines: int


def _signatures(K, dtype: torch.dtype, n_sources: int, grad_mask: int, grad_target: bool):
    """(kernel, signature, constexprs) for the three kernels of module K at one configuration."""
    img = POINTER_TYPES[dtype]
    cdt = K.compute_dtype(dtype)
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
        (K.fwd_kernel, fwd, {**common, **ssim}),
        (K.bwd_coef_kernel, coef, {**common, **ssim}),
        (K.bwd_grad_kernel, grad, {**common, "GRAD_MASK": grad_mask, "GRAD_TGT": grad_target}),
    ]


def _resource_usage(cubin: bytes, arch: int) -> tuple[int, int, int]:
    """(registers, stack bytes, local bytes) of the single kernel in ``cubin``."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = Path(get_ptxas(arch).path).parent / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, check=True, timeout=120)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out.stdout)
    if match is None:
        raise RuntimeError(f"could not parse cuobjdump's resource usage:\n{out.stdout}{out.stderr}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def compile_kernels(arch: int = 90, dtype: torch.dtype = torch.float32, n_sources: int = 4,
                    grad_mask: int = 0b1100, grad_target: bool = False) -> list[CompiledInfo]:
    """Compile the forward and both backward kernels for ``sm_<arch>`` (e.g. 80 A100, 90 H100)
    and return the register / stack / local-memory usage of each. Raises if one fails to compile.
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
        regs, stack, local = _resource_usage(compiled.asm["cubin"], arch)
        infos.append(CompiledInfo(fn.__name__, regs, stack, local,
                                  compiled.asm["ptx"].count("\n")))
    return infos


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m trainer.kernels.aot --arch 90 --dtype bf16`` prints resource usage."""
    import argparse

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "fp64": torch.float64}
    parser = argparse.ArgumentParser(description="Compile the photometric kernels for a CUDA "
                                                 "arch without a GPU; print resource usage.")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--dtype", default="fp32", choices=list(dtypes))
    parser.add_argument("--sources", type=int, default=4, help="identity + warped sources")
    parser.add_argument("--grad-mask", type=lambda v: int(v, 0), default=0b1100,
                        help="bit i set: source i needs a gradient (default: the last two)")
    parser.add_argument("--grad-target", action="store_true", help="the target needs a gradient")
    parser.add_argument("--tile", default="", help="tile HxW (powers of two), default 8x32")
    parser.add_argument("--num-warps", type=int, default=0, help="warps per tile, default 8")
    args = parser.parse_args(argv)
    K = importlib.import_module(KERNEL_MODULE)
    if args.tile:
        K.BLOCK_H, K.BLOCK_W = (int(v) for v in args.tile.lower().split("x"))
    if args.num_warps:
        K.NUM_WARPS = args.num_warps
    infos = compile_kernels(args.arch, dtypes[args.dtype], args.sources, args.grad_mask,
                            args.grad_target)
    print(f"sm_{args.arch} {args.dtype} sources={args.sources} grad_mask={args.grad_mask:#b} "
          f"grad_target={args.grad_target} tile={K.BLOCK_H}x{K.BLOCK_W} warps={K.NUM_WARPS}")
    for i in infos:
        print(f"  {i.name:<18} registers {i.registers:4d}  stack {i.stack_bytes:4d} B  "
              f"local {i.local_bytes:4d} B  ptx {i.ptx_lines} lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
