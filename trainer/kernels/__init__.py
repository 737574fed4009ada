"""Fused Triton kernels (photometric reprojection loss) and their dispatch; the reference path
needs neither Triton nor a GPU. Entry point: ``fused_reprojection_loss``."""
from trainer.kernels.dispatch import IMPLS, fused_reprojection_loss, resolve_impl

__all__ = ["IMPLS", "fused_reprojection_loss", "resolve_impl"]
