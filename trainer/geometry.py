"""Camera geometry as small pure functions (Monodepth2 ``layers.py`` style).

Conventions: OpenCV camera axes (x right, y down, z forward); intrinsics ``K`` (B, 3, 3) in
pixels at the tensor's resolution, pixel *centres* at integer coordinates (column u = 0 is the
centre of the first column), so pixel-coordinate grids line up with
``grid_sample(align_corners=True)``. Poses are (B, 4, 4) rigid transforms; ``T_a_from_b`` maps
points in camera b's frame to camera a's frame. Points are (B, 3, N) with N = H * W in
row-major pixel order.

Under mixed precision the functions that turn depth and pose into pixel coordinates run in fp32
(:func:`full_precision`): in bf16 a coordinate near u = 300 is off by ~1 px.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def full_precision(fn):
    """Decorator: run ``fn`` with autocast off on its tensors' device and fp16 / bf16 tensor
    arguments upcast to fp32 (fp32 and fp64 arguments pass through unchanged)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = [a.float() if isinstance(a, Tensor) and a.dtype in _HALF else a for a in args]
        kwargs = {k: v.float() if isinstance(v, Tensor) and v.dtype in _HALF else v for k, v in kwargs.items()}
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


@full_precision
def disp_to_depth(disp: Tensor, min_depth: float, max_depth: float) -> tuple[Tensor, Tensor]:
    """Sigmoid output in [0, 1] -> (scaled disparity, depth), depth in [min_depth, max_depth]
    (Monodepth2: disparity is linear between 1/max_depth and 1/min_depth)."""
    if not 0 < min_depth < max_depth:
        raise ValueError(f"disp_to_depth: need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
    min_disp, max_disp = 1.0 / max_depth, 1.0 / min_depth
    scaled = min_disp + (max_disp - min_disp) * disp
    return scaled, 1.0 / scaled


def depth_to_disp(depth: Tensor, min_depth: float, max_depth: float) -> Tensor:
    """Inverse of :func:`disp_to_depth`: metric depth -> the network's [0, 1] disparity."""
    min_disp, max_disp = 1.0 / max_depth, 1.0 / min_depth
    return (1.0 / depth - min_disp) / (max_disp - min_disp)


def pixel_grid(b: int, h: int, w: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Tensor:
    """(B, 3, H*W) homogeneous pixel coordinates [u, v, 1], row-major."""
    v, u = torch.meshgrid(torch.arange(h, dtype=dtype, device=device),
                          torch.arange(w, dtype=dtype, device=device), indexing="ij")
    grid = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(h * w, dtype=dtype, device=device)])
    return grid.unsqueeze(0).expand(b, 3, h * w)


@full_precision
def backproject(depth: Tensor, inv_K: Tensor) -> Tensor:
    """Depth (B, 1, H, W) z-depth + inverse intrinsics (B, 3, 3) -> camera points (B, 3, H*W)."""
    if depth.dim() != 4 or depth.shape[1] != 1:
        raise ValueError(f"backproject: depth must be (B, 1, H, W), got {tuple(depth.shape)}")
    b, _, h, w = depth.shape
    rays = inv_K.to(depth.dtype) @ pixel_grid(b, h, w, depth.dtype, depth.device)
    return rays * depth.reshape(b, 1, h * w)


@full_precision
def transform(points: Tensor, T: Tensor) -> Tensor:
    """Apply rigid transforms T (B, 4, 4) to points (B, 3, N): R @ p + t."""
    return T[:, :3, :3] @ points + T[:, :3, 3:4]


@full_precision
def project(points: Tensor, K: Tensor, height: int, width: int, eps: float = 1e-7) -> Tensor:
    """Camera points (B, 3, H*W) -> pixel coordinates (B, H, W, 2) as (u, v); depths below
    ``eps`` are clamped to ``eps`` (points behind the camera land far outside the image)."""
    cam = K.to(points.dtype) @ points
    uv = cam[:, :2] / cam[:, 2:3].clamp(min=eps)
    return uv.reshape(points.shape[0], 2, height, width).permute(0, 2, 3, 1)


def in_bounds(pix: Tensor, height: int, width: int, tol: float = 1e-3) -> Tensor:
    """(B, 1, H, W) bool: the pixel coordinates (B, H, W, 2) fall inside the source image
    (within ``tol`` pixels, so float round-off on the border pixels does not count as outside)."""
    u, v = pix[..., 0], pix[..., 1]
    ok = (u >= -tol) & (u <= width - 1 + tol) & (v >= -tol) & (v <= height - 1 + tol)
    return ok.unsqueeze(1)


def bilinear_warp(image: Tensor, pix_coords: Tensor, padding: str = "border") -> Tensor:
    """Sample ``image`` (B, C, H, W) at pixel coordinates (B, H', W', 2) bilinearly;
    ``padding`` is grid_sample's padding_mode (border | zeros | reflection)."""
    h, w = image.shape[-2:]
    scale = pix_coords.new_tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
    grid = pix_coords * scale - 1.0
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode=padding,
                         align_corners=True)


def rot_from_axisangle(axisangle: Tensor) -> Tensor:
    """Axis-angle vectors (B, 3) -> rotation matrices (B, 3, 3) (Rodrigues' formula)."""
    angle = axisangle.norm(dim=-1, keepdim=True)
    axis = axisangle / angle.clamp(min=1e-12)  # a zero vector gives axis 0 and R = I exactly
    c, s = torch.cos(angle), torch.sin(angle)
    C = 1 - c
    x, y, z = axis[:, 0:1], axis[:, 1:2], axis[:, 2:3]
    rows = [
        x * x * C + c, x * y * C - z * s, x * z * C + y * s,
        y * x * C + z * s, y * y * C + c, y * z * C - x * s,
        z * x * C - y * s, z * y * C + x * s, z * z * C + c,
    ]
    return torch.cat(rows, dim=1).reshape(-1, 3, 3)


@full_precision
def pose_vec_to_mat(axisangle: Tensor, translation: Tensor, invert: bool = False) -> Tensor:
    """Axis-angle (B, 3) + translation (B, 3) -> (B, 4, 4) ``[R | t]``; ``invert`` returns the
    inverse transform ``[R^T | -R^T t]`` (Monodepth2's ``transformation_from_parameters``)."""
    axisangle = axisangle.reshape(-1, 3)
    translation = translation.reshape(-1, 3)
    R = rot_from_axisangle(axisangle)
    t = translation.unsqueeze(-1)
    if invert:
        R = R.transpose(1, 2)
        t = -R @ t
    T = torch.zeros(R.shape[0], 4, 4, dtype=R.dtype, device=R.device)
    T[:, :3, :3] = R
    T[:, :3, 3:] = t
    T[:, 3, 3] = 1
    return T


def stereo_pose(baseline: Tensor) -> Tensor:
    """T_right_from_left (B, 4, 4) for baselines (B,) in metres: the right camera sits at
    +baseline along the left camera's x axis, so X_r = X_l - [b, 0, 0]. A negative baseline
    (horizontally flipped stereo pair) puts the "right" image at -|b|."""
    baseline = baseline.reshape(-1)
    T = torch.eye(4, dtype=baseline.dtype, device=baseline.device).repeat(baseline.shape[0], 1, 1)
    T[:, 0, 3] = -baseline
    return T


@full_precision
def warp_frame(src_image: Tensor, depth_t: Tensor, T_src_from_t: Tensor, K: Tensor,
               padding: str = "border") -> tuple[Tensor, Tensor]:
    """Synthesise the target view from a source frame: for each target pixel, backproject with
    ``depth_t``, move into the source camera, project, sample ``src_image`` there.

    Returns (warped (B, C, H, W), valid (B, 1, H, W) bool: the point lands inside the source
    image and in front of it). ``depth_t`` and ``src_image`` share the resolution of ``K``.
    """
    b, _, h, w = depth_t.shape
    if src_image.shape[-2:] != (h, w):
        raise ValueError(f"warp_frame: source {tuple(src_image.shape)} and depth {tuple(depth_t.shape)} "
                         "must have the same H, W")
    Kf = K.to(depth_t.dtype)
    points = transform(backproject(depth_t, torch.linalg.inv(Kf)), T_src_from_t.to(depth_t.dtype))
    pix = project(points, Kf, h, w)
    valid = in_bounds(pix, h, w) & (points[:, 2] > 1e-3).reshape(b, 1, h, w)
    return bilinear_warp(src_image, pix, padding), valid



def _padded(x: Tensor, pad: int) -> Tensor:
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    out = x if x.dim() == 4 else x.reshape(-1, 1, h, w)  # 4-D as it is: a strided view is not copied first
    out = F.pad(out, (1, 1, 1, 1), mode="reflect")
    if pad > 1:
        out = F.pad(out, (pad - 1,) * 4, mode="replicate")
    return out.reshape(*lead, h + 2 * pad, w + 2 * pad)


def _fold(g: Tensor, pad: int) -> Tensor:
    """Adjoint of :func:`pad_image`: each padded pixel's gradient added onto the pixel it copies."""
    h, w = g.shape[-2] - 2 * pad, g.shape[-1] - 2 * pad
    cols = g[..., :, pad:pad + w].clone()
    for j, src in enumerate(pixel_coordinates(w, pad, torch.int64).tolist()):
        if not pad <= j < pad + w:
            cols[..., :, src] += g[..., :, j]
    out = cols[..., pad:pad + h, :].clone()
    for i, src in enumerate(pixel_coordinates(h, pad, torch.int64).tolist()):
        if not pad <= i < pad + h:
            out[..., src, :] += cols[..., i, :]
    return out


class _PadImage(torch.autograd.Function):
    """:func:`pad_image` with a backward of two copies and a few row / column adds (torch's
    replication-pad backward is several times slower on a depth stack; docs/depth.md)."""

    @staticmethod
    def forward(ctx, x: Tensor, pad: int) -> Tensor:
        ctx.pad = pad
        return _padded(x, pad)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _fold(g, ctx.pad), None


def pad_image(x: Tensor, pad: int) -> Tensor:
    """Pad the last two dims (any leading dims; sides >= 2) by ``pad``: reflection by one pixel
    (what SSIM's windows see), then the border replicated for the other ``pad - 1``."""
    return _PadImage.apply(x, pad) if pad else x


def pixel_coordinates(size: int, pad: int = 0, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> Tensor:
    """Pixel coordinates 0 .. size-1 along one axis, padded like :func:`pad_image` (size 5, pad 2:
    [1, 1, 0, 1, 2, 3, 4, 3, 3]): where each pixel of a padded image comes from."""
    i = torch.arange(-pad, size + pad, device=device).clamp(-1, size).abs()
    return ((size - 1) - (size - 1 - i).abs()).to(dtype)


def _depth(depths: Tensor, disp_range: tuple[float, float] | None) -> Tensor:
    """``depths`` as depth: as given, or the network's disparity in [0, 1] through :func:`disp_to_depth`'s
    formula when ``disp_range`` = (1 / max_depth, 1 / min_depth)."""
    if disp_range is None:
        return depths
    return 1.0 / (disp_range[0] + (disp_range[1] - disp_range[0]) * depths)


def sampling_grid(depths: Tensor, Ap: Tensor, c: Tensor, height: int, width: int,
                  disp_range: tuple[float, float] | None = None, eps: float = 1e-7) -> Tensor:
    """Where target pixels land in a source image, as ``grid_sample`` coordinates (B, S, H', W', 2).

    A target pixel p with depth ``d = depths[b, s, i, j]`` (B, S, H', W'; disparities when
    ``disp_range`` is given, see :func:`_depth`) sits at ``d * A p + c`` in the source camera
    (``Ap`` (B, 3, H', W'): A p with A = K R K^-1; ``c`` (B, 3): K t), which projects to pixel
    (x / z, y / z), z clamped at ``eps``; normalised for a ``height`` x ``width`` source
    (``align_corners=True``). Element-wise only: inductor fuses it into one loop."""
    b = Ap.shape[0]
    depths = _depth(depths, disp_range)
    x, y, z = (depths * Ap[:, k:k + 1] + c[:, k].view(b, 1, 1, 1) for k in range(3))
    z = z.clamp(min=eps)
    return torch.stack([(x / z) * (2.0 / max(width - 1, 1)) - 1.0, (y / z) * (2.0 / max(height - 1, 1)) - 1.0],
                       dim=-1)


def sampling_grid_backward(g: Tensor, depths: Tensor, Ap: Tensor, c: Tensor, height: int, width: int,
                           disp_range: tuple[float, float] | None = None,
                           eps: float = 1e-7) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`sampling_grid` for the upstream gradient ``g`` (B, S, H', W', 2):
    (depths (B, S, H', W'), Ap (B, 3, H', W'), c as per-pixel maps (B, 3, H', W') still to be summed)."""
    b = Ap.shape[0]
    depths = _depth(depths, disp_range)
    x, y, z_raw = (depths * Ap[:, k:k + 1] + c[:, k].view(b, 1, 1, 1) for k in range(3))
    z = z_raw.clamp(min=eps)
    gx = g[..., 0] * (2.0 / max(width - 1, 1)) / z
    gy = g[..., 1] * (2.0 / max(height - 1, 1)) / z
    gz = -(gx * x + gy * y) / z * (z_raw >= eps)  # the clamp passes the gradient at the bound, as torch
    grad_depths = gx * Ap[:, 0:1] + gy * Ap[:, 1:2] + gz * Ap[:, 2:3]
    grad_cam_d = torch.stack([(gx * depths).sum(1), (gy * depths).sum(1), (gz * depths).sum(1)], dim=1)
    grad_cam = torch.stack([gx.sum(1), gy.sum(1), gz.sum(1)], dim=1)  # summed over the scales: (B, 3, H', W')
    if disp_range is not None:  # d depth / d disparity = -(max_disp - min_disp) * depth^2
        grad_depths = grad_depths * (-(disp_range[1] - disp_range[0]) * depths * depths)
    return grad_depths, grad_cam_d, grad_cam


GRID_EAGER = SimpleNamespace(forward=sampling_grid, backward=sampling_grid_backward)
""":class:`SamplingGrid`'s two functions (``trainer.kernels.compiled_cpu.grid_functions`` compiles them)."""


class SamplingGrid(torch.autograd.Function):
    """:func:`sampling_grid` with its hand-written gradient (:func:`sampling_grid_backward`): one
    pass, where autograd through the compiled forward reduced A's and t's gradients in ~12 passes
    (3-4x slower; docs/depth.md)."""

    @staticmethod
    def forward(ctx, depths: Tensor, Ap: Tensor, c: Tensor, height: int, width: int,
                disp_range: tuple[float, float] | None, fns: SimpleNamespace):
        ctx.save_for_backward(depths, Ap, c)
        ctx.meta = (height, width, disp_range, fns)
        return fns.forward(depths, Ap, c, height, width, disp_range)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        height, width, disp_range, fns = ctx.meta
        grad_depths, grad_ap, grad_c = fns.backward(g.contiguous(), *ctx.saved_tensors, height, width, disp_range)
        return grad_depths, grad_ap, grad_c.sum(dim=(2, 3)), None, None, None, None


@full_precision
def warp_scales(src_image: Tensor, depths: Tensor, T_src_from_t: Tensor, K: Tensor, pad: int = 0,
                padding: str = "border", grid_fns: SimpleNamespace | None = None,
                disp_range: tuple[float, float] | None = None, depths_padded: bool = False) -> Tensor:
    """Warp ``src_image`` (B, C, H, W) into the target view once per depth map in ``depths``
    (B, S, H, W), e.g. every decoder scale upsampled: (B, C, S, H + 2 pad, W + 2 pad). With
    ``disp_range`` = (1 / max_depth, 1 / min_depth), ``depths`` holds the network's [0, 1]
    disparities instead, turned into depth as :func:`disp_to_depth` does, inside the projection.

    Same sampling as :func:`warp_frame` (bilinear, ``align_corners=True``, source depth clamped at
    1e-7), without its validity mask. ``pad``: the output is the warp padded by ``pad`` pixels as
    :func:`pad_image` pads, sampled directly (a padded pixel samples where the pixel it copies does,
    so the values are the padded warp's exactly, and its gradient reaches that pixel's depth).
    ``grid_fns``: :data:`GRID_EAGER` (default) or compiled copies. One ``grid_sample`` for all
    scales: the scales are stacked along the output's height, the source is never copied.
    ``depths_padded``: ``depths`` is already ``pad_image(depths, pad)`` (B, S, H + 2 pad, W + 2 pad),
    e.g. padded once for all source frames of a target (one pad; one fold of their summed gradients)."""
    b, s, h, w = depths.shape
    if depths_padded:
        h, w = h - 2 * pad, w - 2 * pad
    if src_image.dim() != 4 or src_image.shape[0] != b or src_image.shape[-2:] != (h, w):
        raise ValueError(f"warp_scales: source {tuple(src_image.shape)} and depths {tuple(depths.shape)} "
                         "must share B, H, W")
    Kf = K.to(depths.dtype)
    T = T_src_from_t.to(depths.dtype)
    hp, wp = h + 2 * pad, w + 2 * pad
    u = pixel_coordinates(w, pad, depths.dtype, depths.device)
    v = pixel_coordinates(h, pad, depths.dtype, depths.device)
    pixels = torch.stack([u.repeat(hp), v.repeat_interleave(wp), torch.ones_like(u).repeat(hp)])  # (3, H' W')
    Ap = (Kf @ T[:, :3, :3] @ torch.linalg.inv(Kf) @ pixels).reshape(b, 3, hp, wp)
    c = (Kf @ T[:, :3, 3:4])[..., 0]
    padded = depths if depths_padded else pad_image(depths, pad)
    grid = SamplingGrid.apply(padded, Ap, c, h, w, disp_range, grid_fns or GRID_EAGER)
    out = F.grid_sample(src_image, grid.reshape(b, s * hp, wp, 2).to(src_image.dtype), mode="bilinear",
                        padding_mode=padding, align_corners=True)
    return out.reshape(b, src_image.shape[1], s, hp, wp)
