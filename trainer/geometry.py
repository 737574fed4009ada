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



@full_precision
def reprojection_coefficients(T_src_from_t: Tensor, K: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """The depth-independent part of warping target pixels into a source camera.

    For target pixel p = [u, v, 1] at depth d, the source camera sees ``K (R d K^-1 p + t)`` =
    ``d * (K R K^-1 p) + K t``. Returns (M (B, H*W, 3) with rows ``K R K^-1 p``, Kt (B, 1, 3)),
    so that warping with several depth maps (e.g. every decoder scale, upsampled) costs one
    multiply-add per depth instead of a backprojection, a transform and a projection each."""
    dtype = T_src_from_t.dtype if T_src_from_t.is_floating_point() else torch.float32
    Kf = K.to(dtype)
    T = T_src_from_t.to(dtype)
    KRKinv = Kf @ T[:, :3, :3] @ torch.linalg.inv(Kf)
    grid = pixel_grid(T.shape[0], height, width, dtype, T.device)  # (B, 3, N)
    return grid.transpose(1, 2) @ KRKinv.transpose(1, 2), (Kf @ T[:, :3, 3:4]).transpose(1, 2)


@full_precision
def warp_depths(src_image: Tensor, depths: Tensor, M: Tensor, Kt: Tensor, padding: str = "border",
                eps: float = 1e-7) -> Tensor:
    """Warp ``src_image`` (B, C, H, W) into the target view once per depth map in ``depths``
    (S, B, 1, H, W), with :func:`reprojection_coefficients` (M, Kt) of the source's pose.

    Returns (S*B, C, H, W), scale-major. Same sampling as :func:`warp_frame` (bilinear,
    ``align_corners=True``, source depth clamped at ``eps``), without its validity mask."""
    s, b, _, h, w = depths.shape
    if src_image.shape[0] != b or src_image.shape[-2:] != (h, w):
        raise ValueError(f"warp_depths: source {tuple(src_image.shape)} and depths {tuple(depths.shape)} "
                         "must share B, H, W")
    cam = depths.reshape(s, b, h * w, 1) * M.to(depths.dtype) + Kt.to(depths.dtype)  # (S, B, N, 3)
    uv = cam[..., :2] / cam[..., 2:].clamp(min=eps)
    scale = uv.new_tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
    grid = (uv * scale - 1.0).reshape(s * b, h, w, 2)
    src = src_image.unsqueeze(0).expand(s, *src_image.shape).reshape(s * b, *src_image.shape[1:])
    return F.grid_sample(src, grid.to(src.dtype), mode="bilinear", padding_mode=padding, align_corners=True)
