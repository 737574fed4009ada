"""Training-time augmentation that keeps multi-frame samples consistent.

* Colour jitter: one set of factors drawn per sample and applied identically to every frame
  (the photometric loss compares frames, so they must be jittered alike).
* Horizontal flip of every spatial key, with the intrinsics' principal point mirrored, flow's
  u component negated, and the stereo baseline negated (after a flip the right image shows
  the mirrored world from the camera at -baseline).

All randomness comes from the ``torch.Generator`` the caller passes (exact resume).
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from data_shards.schema import EncodedImage

#: sample keys holding images / maps with the spatial layout (..., H, W)
SPATIAL_KEYS = ("rgb", "rgb_prev", "rgb_next", "rgb_right", "depth", "seg", "flow")


@dataclass(frozen=True)
class JitterParams:
    """Factors of one colour jitter; ``order`` is a permutation of the four adjustments
    (0 brightness, 1 contrast, 2 saturation, 3 hue), as torchvision's ColorJitter does."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[int, ...]


def sample_jitter(generator: torch.Generator, brightness: float = 0.2, contrast: float = 0.2,
                  saturation: float = 0.2, hue: float = 0.1) -> JitterParams:
    """Draw jitter factors uniformly: brightness/contrast/saturation in [1 - x, 1 + x], hue in
    [-hue, hue] (Monodepth2's ranges by default)."""
    if not (0 <= brightness and 0 <= contrast and 0 <= saturation and 0 <= hue <= 0.5):
        raise ValueError(f"colour jitter ranges must be >= 0 (hue <= 0.5), got {brightness}, "
                         f"{contrast}, {saturation}, {hue}")
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    order = tuple(torch.randperm(4, generator=generator).tolist())
    return JitterParams(
        brightness=1 + brightness * (2 * u[0] - 1),
        contrast=1 + contrast * (2 * u[1] - 1),
        saturation=1 + saturation * (2 * u[2] - 1),
        hue=hue * (2 * u[3] - 1),
        order=order,
    )


#: one jitter as a row of a float64 tensor: (applied 0/1, brightness, contrast, saturation, hue,
#: order[0..3]); rows collate into a batch's ``jitter`` (B, 9), so the step can jitter on its device
JITTER_ROW = 9
_IDENTITY = (1.0, 1.0, 1.0, 0.0)


def jitter_row(params: JitterParams, applied: bool = True) -> Tensor:
    """``params`` as one :data:`JITTER_ROW` row (float64: the drawn factors exactly)."""
    return torch.tensor([float(applied), params.brightness, params.contrast, params.saturation, params.hue,
                         *params.order], dtype=torch.float64)


def jitter_images(images: Tensor, rows: Tensor) -> Tensor:
    """Jitter each image of (N, 3, H, W) by its row of ``rows`` (N, 9); uint8 in and out (float in
    [0, 1] also). torchvision's ColorJitter formulas (brightness scales; contrast and saturation blend
    with the grayscale mean / grayscale; hue rotates HSV hue) in the row's order, computed in float32,
    clamped after each adjustment, rounded once at the end (torchvision truncates after each: results
    are within a few levels). On the CPU one image at a time (it stays in cache), so an
    image's result never depends on what it is stacked with; on other devices the whole stack at once."""
    if images.dim() != 4 or images.shape[1] != 3 or rows.shape != (images.shape[0], JITTER_ROW):
        raise ValueError(f"jitter_images: expected (N, 3, H, W) images and (N, {JITTER_ROW}) rows, "
                         f"got {tuple(images.shape)} and {tuple(rows.shape)}")
    if images.device.type != "cpu":
        return _jitter_stack(images, rows)
    out = _result_like(images)
    for i in range(images.shape[0]):
        _jitter_stack(images[i:i + 1], rows[i:i + 1], out[i:i + 1])
    return out


def _jitter_plan(rows: Tensor) -> list[tuple[int, list[float]]]:
    """[(adjustment, factor per row)] in application order; a row whose adjustment at a position
    is another one (or that is not applied) gets this one's identity; all-identity steps are left
    out, as torchvision's ColorJitter skips a zero range."""
    plan = []
    table = rows.detach().to("cpu", torch.float64).tolist()
    for position in range(4):
        for op in range(4):
            factors = [row[1 + op] if row[0] > 0 and int(row[5 + position]) == op else _IDENTITY[op]
                       for row in table]
            if any(f != _IDENTITY[op] for f in factors):
                plan.append((op, factors))
    return plan


def _result_like(images: Tensor) -> Tensor:
    """The jitter's output for ``images``: the same dtype if integer, float32 if floating."""
    return torch.empty(images.shape, dtype=images.dtype if not images.is_floating_point() else torch.float32,
                       device=images.device)


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, ...], device: torch.device) -> list[Tensor]:
    """Float32 work planes for one jitter of ``shape`` (N, 3, H, W): the image, then
    :data:`_PLANES` planes (N, H, W). On the CPU they are kept per thread for the last shape and
    reused: a fresh half-megabyte tensor costs the CPU ~10x the arithmetic done on it (page faults)."""
    n, _, h, w = shape
    if device.type != "cpu":
        return [torch.empty(shape, device=device)] + [torch.empty(n, h, w, device=device) for _ in range(_PLANES)]
    kept = getattr(_SCRATCH, "planes", None)
    if kept is None or kept[0].shape != shape:
        kept = _SCRATCH.planes = [torch.empty(shape)] + [torch.empty(n, h, w) for _ in range(_PLANES)]
    return kept


def _jitter_stack(images: Tensor, rows: Tensor, out: Tensor | None = None) -> Tensor:
    """Jitter the stack ``images`` (N, 3, H, W) at once by ``rows`` into ``out`` (made if None)."""
    out = _result_like(images) if out is None else out
    integer = not images.is_floating_point()
    bound = 255.0 if integer else 1.0
    x, *planes = _scratch(tuple(images.shape), images.device)
    x = x if integer else out  # a float result is jittered where it is returned
    x.copy_(images)
    for op, factors in _jitter_plan(rows):
        # one image: a Python scalar (the CPU path); a stack: a factor per image
        f = factors[0] if len(factors) == 1 else \
            torch.tensor(factors, dtype=torch.float32, device=x.device).view(-1, 1, 1, 1)
        _ADJUST[op](x, f, bound, planes)
    if integer:
        out.copy_(x.add_(0.5))  # rounded (values are >= 0)
    return out


def apply_jitter(image: Tensor, params: JitterParams) -> Tensor:
    """Apply one jitter to an image (3, H, W) or a stack (..., 3, H, W), uint8 or float in [0, 1]
    (:func:`jitter_images`); returns the same shape and dtype."""
    flat = image.reshape(-1, 3, *image.shape[-2:])
    rows = jitter_row(params).expand(flat.shape[0], JITTER_ROW)
    return jitter_images(flat, rows).reshape(image.shape)


#: work planes (N, H, W) an adjustment may overwrite (:func:`_scratch`)
_PLANES = 6


def _gray(x: Tensor, out: Tensor) -> Tensor:
    """ITU-R 601 luma (N, 1, H, W) of float RGB (N, 3, H, W) into ``out`` (N, H, W): torchvision's
    grayscale weights."""
    r, g, b = x.unbind(dim=-3)
    return torch.mul(r, 0.2989, out=out).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _brightness(x: Tensor, factor: Tensor | float, bound: float, planes: list[Tensor]) -> Tensor:
    return x.mul_(factor).clamp_(0.0, bound)


def _contrast(x: Tensor, factor: Tensor | float, bound: float, planes: list[Tensor]) -> Tensor:
    mean = _gray(x, planes[0]).mean(dim=(-3, -2, -1), keepdim=True)
    return x.mul_(factor).add_(mean.mul_(1.0 - factor)).clamp_(0.0, bound)


def _saturation(x: Tensor, factor: Tensor | float, bound: float, planes: list[Tensor]) -> Tensor:
    gray = _gray(x, planes[0]).mul_(1.0 - factor)
    return x.mul_(factor).add_(gray).clamp_(0.0, bound)


#: hsv -> rgb: channel n of a pixel of hue H (in sextants) is v - c * clamp(min(k, 4 - k), 0, 1) with
#: k = (n + H) mod 6, n = 5, 3, 1 for r, g, b (the closed form of the six-case table)
_HSV_CHANNEL_OFFSETS = (5.0, 3.0, 1.0)


def _is_max(channel: Tensor, high: Tensor, out: Tensor) -> Tensor:
    """1.0 where ``channel`` equals the per-pixel maximum ``high``, else 0.0, into ``out`` (sign
    arithmetic: comparisons and ``where`` are ~20x slower than arithmetic on the CPU)."""
    return torch.sub(channel, high, out=out).sign_().add_(1.0)


def _hue_sextant(x: Tensor, hue: Tensor | float, planes: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(value, chroma, hue in sextants + the shift) planes of float RGB (N, 3, H, W): hue is (g - b) / c
    where r is the max, (b - r) / c + 2 where g is (and r is not), (r - g) / c + 4 elsewhere
    (torchvision's tie order)."""
    high, chroma, red, green, blue, num = planes
    r, g, b = x.unbind(dim=-3)
    torch.maximum(torch.maximum(r, g, out=high), b, out=high)
    torch.sub(high, torch.minimum(torch.minimum(r, g, out=chroma), b, out=chroma), out=chroma)
    _is_max(r, high, red)
    _is_max(g, high, green).mul_(torch.neg(red, out=blue).add_(1.0))
    blue.sub_(green)  # 1 - red - green
    torch.sub(g, b, out=num).mul_(red)
    num += torch.sub(b, r, out=red).add_(chroma, alpha=2.0).mul_(green)
    num += torch.sub(r, g, out=red).add_(chroma, alpha=4.0).mul_(blue)
    shift = hue.view(-1, 1, 1) * 6.0 if isinstance(hue, Tensor) else 6.0 * hue
    return high, chroma, num.div_(torch.clamp_min(chroma, 1e-12, out=red)).add_(shift)


def _shift_hue(x: Tensor, hue: Tensor | float, bound: float, planes: list[Tensor]) -> Tensor:
    """Rotate the HSV hue of float RGB (N, 3, H, W) by ``hue`` (N, 1, 1, 1) turns, in place; value and
    saturation (max and max - min of the channels) are kept, as in torchvision's adjust_hue, from the
    closed forms of rgb -> hsv -> rgb on single planes (no HSV stack, no gather). Rows with hue 0 are
    kept as they are."""
    del bound  # max and min are kept: the result stays in range
    mixed = isinstance(hue, Tensor) and bool((hue == 0).any())
    before = x.clone() if mixed else None
    high, chroma, sextant = _hue_sextant(x, hue, planes)
    k, ramp = planes[2], planes[3]
    for n, offset in enumerate(_HSV_CHANNEL_OFFSETS):
        torch.add(sextant, offset, out=k)
        k -= torch.mul(k, 1.0 / 6.0, out=ramp).floor_().mul_(6.0)  # k mod 6 (remainder is ~15x slower)
        torch.minimum(k, torch.neg(k, out=ramp).add_(4.0), out=ramp).clamp_(0.0, 1.0)
        torch.sub(high, ramp.mul_(chroma), out=x[:, n])
    return x if before is None else x.copy_(torch.where(hue == 0, before, x))


_ADJUST = (_brightness, _contrast, _saturation, _shift_hue)


def jitter_frames(sample: dict[str, Any], keys: Iterable[str], params: JitterParams,
                  prefix: str = "aug_") -> dict[str, Any]:
    """Add ``prefix + key`` with the jittered copy of each image ``key``; the originals stay
    untouched (the loss must see unaugmented frames). Returns a new dict."""
    keys = list(keys)
    for key in keys:
        if key not in sample:
            raise KeyError(f"jitter_frames: sample {sample.get('__key__', '?')} has no key {key!r}")
        if isinstance(sample[key], EncodedImage):
            raise ValueError(f"jitter_frames: sample {sample.get('__key__', '?')}: {key!r} is still encoded "
                             "(data.decode_on=device): jitter it in the step (task.jitter_on=step)")
    out = dict(sample)
    if keys:
        stack = torch.stack([sample[key] for key in keys])
        for key, image in zip(keys, jitter_images(stack, jitter_row(params).expand(len(keys), JITTER_ROW))):
            out[prefix + key] = image
    return out


def jitter_batch(batch: dict[str, Any], keys: Iterable[str], prefix: str = "aug_") -> dict[str, Any]:
    """The step-side jitter: ``prefix + key`` for each image ``key`` (B, 3, H, W) of a batch, each
    sample jittered by its row of ``batch["jitter"]`` (B, 9), on the batch's device. On the CPU this
    gives exactly what :func:`jitter_frames` gives per sample in the loader. Returns a new dict."""
    keys = list(keys)
    rows = batch["jitter"]
    stack = torch.stack([batch[key] for key in keys], dim=1)  # (B, F, 3, H, W)
    b, f = stack.shape[:2]
    flat = jitter_images(stack.flatten(0, 1), rows.repeat_interleave(f, dim=0)).view(stack.shape)
    out = dict(batch)
    for i, key in enumerate(keys):
        out[prefix + key] = flat[:, i]
    return out


def hflip_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Mirror a sample left-right: every spatial key (also ``aug_*`` copies; a frame still encoded is
    marked to be flipped once decoded), ``K``'s principal
    point (cx -> W - 1 - cx, pixel centres at integers), flow u -> -u, baseline -> -baseline.
    Returns a new dict; unknown non-spatial keys are copied as they are."""
    out = dict(sample)
    width = None
    for key, value in sample.items():
        base = key[4:] if key.startswith("aug_") else key
        if base in SPATIAL_KEYS and isinstance(value, Tensor):
            out[key] = value.flip(-1)
            width = value.shape[-1]
        elif isinstance(value, EncodedImage):  # flipped where it is decoded (trainer.tasks.device_decode)
            out[key] = dataclasses.replace(value, flipped=not value.flipped)
            width = value.hw[1]
    if "flow" in out:
        flow = out["flow"].clone()
        flow[0] = -flow[0]
        out["flow"] = flow
    if "K" in sample:
        if width is None:
            raise KeyError(f"hflip_sample: sample {sample.get('__key__', '?')} has K but no image")
        K = sample["K"].clone()
        K[0, 2] = (width - 1) - K[0, 2]
        K[0, 1] = -K[0, 1]
        out["K"] = K
    if "baseline" in sample:
        out["baseline"] = -sample["baseline"]
    return out
