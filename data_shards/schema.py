"""The sample schema: every key a shard may hold, its encoding, dtype, units and invalid value.

This module is the contract between the dataset converters (``sources/``), the shard
writer, the stream reader and every training task. It imports nothing from ``trainer``.

A *sample* is one target frame ``t`` with everything a task may need about it. In a
tar shard each key is one member ``<__key__>.<key>``; e.g. ``seq0003_f000012.rgb.png``.

Keys (``E`` = encoding in the shard, ``D`` = decoded type returned by :func:`decode_sample`)
-------------------------------------------------------------------------------------------
``__key__``        str. Unique within a split, deterministic: ``<sequence>_f<frame:06d>``
                   (real datasets use their own ids, made tar-safe: only ``[A-Za-z0-9_-]``).
``rgb.png``        E: 8-bit RGB PNG.  D: uint8 tensor (3, H, W), left/only camera at time t.
``rgb_prev.png``   Same, frame t-1 (same camera). Present only in video datasets.
``rgb_next.png``   Same, frame t+1 (same camera). Present only in video datasets.
``rgb_right.png``  Same, the right stereo camera at time t. Present only in stereo datasets.
``rgb*.jpg``       The same four images stored as baseline JPEG instead (``--image-format jpeg``,
                   4:4:4, the quality in the manifest's ``writer.images``): smaller and faster to
                   decode than the PNG, lossy (docs/data.md, "Feeding a GPU"). A split holds one
                   of the two encodings. D: the same uint8 tensor (3, H, W).
``depth.png``      E: 16-bit grayscale PNG, value = round(depth_m * 256) (the KITTI convention),
                   0 = invalid (sky, no LiDAR return, beyond 255.99 m).
                   D: float32 tensor (1, H, W) in metres, 0.0 where invalid. Depth is z-depth
                   along the optical axis, not ray length.
``seg.png``        E: 8-bit grayscale PNG of class ids, 255 = ignore: Cityscapes *train ids*
                   (0..18) unless the manifest's ``source.label_set`` says otherwise
                   (``cityscapes19`` | ``nyu40`` | ``nyu13``).
                   D: uint8 tensor (H, W).
``flow.npz``       E: ``numpy.savez_compressed`` (read with ``allow_pickle=False``) of ``uv``:
                   int16 (2, H, W), forward optical flow t -> t+1 times 64 (KITTI's 1/64-pixel
                   fixed point, |flow| < 512 px; u right, v down) and ``valid``: uint8 (H, W)
                   (1 valid, 0 occluded / leaves the image). ~8x smaller than float32.
                   D: float32 tensor (3, H, W) = (u, v, valid). Schema v1 shards' ``flow.npy``
                   (float32 (H, W, 3) .npy) are still read.
``json``           E: UTF-8 JSON object ("meta"). D: dict. Fields:
                   ``K``: 3x3 intrinsics (pixels) at this sample's resolution, row-major.
                   ``baseline_m``: signed stereo baseline in metres: the other view
                   (``rgb_right.png``) sits at +baseline_m along this camera's x axis (about
                   -0.54 when the target is KITTI's right camera), present with ``rgb_right.png``.
                   ``T_wc``: 4x4 camera-to-world pose at t (OpenCV camera axes: x right,
                   y down, z forward), optional; ``T_wc_prev`` / ``T_wc_next`` likewise.
                   ``source``: provenance (dataset, path / drive / frame), always present.
                   ``classes``: sorted list of train ids present in ``seg.png`` (optional).
                   ``label``: int, single-label image class index (optional; from image
                   folders, the manifest's ``source.classes`` names it).

Any key may be absent from a dataset; ``manifest.json`` lists the keys every sample of a
split has. Nothing is ever pickled: PNG, .npz / .npy (no pickle) and JSON only.

Image sizes are checked before any pixel is decoded: each PNG's header (and a flow array's header)
must give the split's size where its manifest states one (:func:`declared_image_hw`), and never more
than :data:`MAX_IMAGE_PIXELS` pixels, so that a decompression bomb (a few hundred KB that decode to
hundreds of MB) is refused unread.
"""
from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image

SCHEMA_VERSION = 2
"""Written by this code. v2: flow as 1/64-px int16 ``flow.npz`` (v1: float32 ``flow.npy``)."""
READABLE_SCHEMA_VERSIONS = (1, 2)
"""Schema versions this code reads."""

#: Cityscapes' 19 training classes, in train-id order.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)
IGNORE_INDEX = 255
DEPTH_PNG_SCALE = 256.0
FLOW_SCALE = 64.0
"""Flow is stored in 1/FLOW_SCALE pixels as int16 (KITTI's flow PNGs use the same step)."""
FLOW_MAX = 32767 / FLOW_SCALE
"""Largest storable |flow| component in pixels (~512)."""

IMAGE_NAMES = ("rgb", "rgb_prev", "rgb_next", "rgb_right")
IMAGE_KEYS = tuple(f"{n}.png" for n in IMAGE_NAMES)
JPEG_IMAGE_KEYS = tuple(f"{n}.jpg" for n in IMAGE_NAMES)
"""The image members of a split written with ``--image-format jpeg``."""
ALL_KEYS = IMAGE_KEYS + ("depth.png", "seg.png", "flow.npz", "json")
LEGACY_KEYS = ("flow.npy",)
"""Members of older schema versions that readers still decode (writers never produce them)."""
KNOWN_KEYS = ALL_KEYS + JPEG_IMAGE_KEYS + LEGACY_KEYS
RGB_KEYS = IMAGE_KEYS + JPEG_IMAGE_KEYS


@dataclass(frozen=True)
class ImageEncoding:
    """How the RGB frames of a split are stored: lossless PNG (the default) or JPEG at ``quality``."""

    format: str = "png"
    """png | jpeg"""
    quality: int = 95
    """JPEG quality (1-100; 4:4:4, no chroma subsampling); unused for PNG."""

    def __post_init__(self) -> None:
        if self.format not in ("png", "jpeg"):
            raise SchemaError(f"image format {self.format!r}: expected png or jpeg")
        if not 1 <= int(self.quality) <= 100:
            raise SchemaError(f"JPEG quality {self.quality}: expected 1..100")

    @property
    def ext(self) -> str:
        """The member extension of an image: ``png`` or ``jpg``."""
        return "png" if self.format == "png" else "jpg"

    @property
    def keys(self) -> tuple[str, ...]:
        """The four image members in this encoding (``rgb.png`` ... or ``rgb.jpg`` ...)."""
        return IMAGE_KEYS if self.format == "png" else JPEG_IMAGE_KEYS

    def describe(self) -> dict[str, Any]:
        """The manifest's record of it (``writer.images``)."""
        return {"format": self.format, "quality": int(self.quality)}


PNG = ImageEncoding()


MAX_IMAGE_PIXELS = 1 << 25
"""The most pixels (height x width) an image member may have: ~33.6 million, an 8K frame."""
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SchemaError(ValueError):
    """A sample does not follow the schema; the message names the sample key and field."""


def declared_image_hw(source: dict[str, Any]) -> Optional[tuple[int, int]]:
    """(height, width) of every image of a split as its manifest's ``source`` states it: ``resolution``
    (synthetic world, image folders) or the ``geometry`` resize (KITTI, Cityscapes, NYU); None where
    the split keeps each image's own size (then only :data:`MAX_IMAGE_PIXELS` applies)."""
    geometry = source.get("geometry") or {}
    hw = source.get("resolution") or geometry.get("resize_hw")
    if not hw and geometry.get("crop_tlhw"):
        hw = geometry["crop_tlhw"][2:]
    if isinstance(hw, (list, tuple)) and len(hw) == 2 and all(isinstance(v, int) and v > 0 for v in hw):
        return int(hw[0]), int(hw[1])
    return None


def png_header_hw(data: bytes) -> Optional[tuple[int, int]]:
    """(height, width) from a PNG's IHDR chunk, without decoding; None when ``data`` is no PNG."""
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")


def check_image_hw(hw: tuple[int, int], expected_hw: Optional[tuple[int, int]], what: str = "PNG header") -> None:
    """Refuse an image of ``hw`` (from its header) that is not the split's size or too large to decode."""
    h, w = hw
    if expected_hw is not None and (h, w) != tuple(expected_hw):
        raise SchemaError(f"{what} says {h}x{w} (height x width), the manifest's size is "
                          f"{expected_hw[0]}x{expected_hw[1]}: refused before decoding")
    if h * w > MAX_IMAGE_PIXELS:
        raise SchemaError(f"{what} says {h}x{w} = {h * w / 1e6:.1f} million pixels, above the decode limit of "
                          f"{MAX_IMAGE_PIXELS / 1e6:.1f} million (data_shards.schema.MAX_IMAGE_PIXELS): "
                          f"refused before decoding")


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


#: zlib level of the RGB PNGs (:func:`_rgb_png_bytes`): as fast to write as Pillow's level 1 with its
#: adaptive filters, and smaller
RGB_PNG_LEVEL = 3


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _rgb_png_bytes(img: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> an 8-bit RGB PNG whose every row uses the Up filter (the row minus the one
    above, mod 256). Pillow picks filters per row, mostly Paeth, whose undoing costs a decoder as much as
    the inflate; Up is undone at memory speed, so these decode ~2x faster (docs/data.md, "Feeding a
    GPU"). Any PNG reader reads them."""
    h, w, _ = img.shape
    flat = img.reshape(h, 3 * w)
    rows = np.empty((h, 1 + 3 * w), np.uint8)
    rows[:, 0] = 2  # the Up filter (above the first row: zeros)
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8: wraps mod 256, as the filter does
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), RGB_PNG_LEVEL)) + _png_chunk(b"IEND", b""))


def rgb_png_row_filters(data: bytes) -> set[int]:
    """The filter types (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth) of an 8-bit RGB, non-interlaced PNG's
    rows; empty for any other image. :func:`_rgb_png_bytes` writes Up on every row; Pillow's adaptive
    choice (older shards) is mostly Paeth, ~2x slower to decode."""
    if not data.startswith(_PNG_SIGNATURE):
        return set()
    pos, idat, header = len(_PNG_SIGNATURE), [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or header[2:4] != (8, 2) or header[6] != 0 or not idat:
        return set()
    width, height = header[:2]
    try:
        rows = zlib.decompress(b"".join(idat))
    except zlib.error:
        return set()
    return set(rows[::1 + 3 * width][:height])


def encode_depth(depth_m: np.ndarray) -> bytes:
    """Metric depth (H, W) float -> 16-bit PNG bytes; non-finite, <=0 or too far -> 0."""
    d = np.asarray(depth_m, dtype=np.float64)
    scaled = np.where(np.isfinite(d) & (d > 0), np.round(d * DEPTH_PNG_SCALE), 0.0)
    scaled = np.where(scaled > 65535, 0.0, scaled)
    return _png_bytes(scaled.astype(np.uint16))


def encode_sample(sample: dict[str, Any], images: ImageEncoding = PNG) -> dict[str, Any]:
    """Turn a sample of numpy arrays / dicts into the bytes stored in the tar.

    Accepts ``rgb*`` as uint8 (H, W, 3), ``depth`` as float metres (H, W), ``seg`` as
    uint8 (H, W), ``flow`` as float32 (H, W, 3), ``meta`` as dict. Returns a dict with
    ``__key__`` and schema keys mapped to bytes, ready for ``webdataset.TarWriter``; the RGB
    images as ``images`` says (``rgb.png`` or ``rgb.jpg``).
    """
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or any(c in key for c in "./\\ "):
        raise SchemaError(f"sample key {key!r}: must be a non-empty string without '.', '/', spaces")
    out: dict[str, Any] = {"__key__": key}
    for name in IMAGE_NAMES:
        if name in sample:
            out[f"{name}.{images.ext}"] = encode_rgb(sample[name], key, name, images)
    if "depth" in sample:
        out["depth.png"] = encode_depth(sample["depth"])
    if "seg" in sample:
        seg = np.asarray(sample["seg"])
        if seg.dtype != np.uint8 or seg.ndim != 2:
            raise SchemaError(f"sample {key}: seg must be uint8 (H, W), got {seg.dtype} {seg.shape}")
        out["seg.png"] = _png_bytes(seg)
    if "flow" in sample:
        out["flow.npz"] = encode_flow(sample["flow"], key)
    meta = sample.get("meta")
    if meta is None or "source" not in meta:
        raise SchemaError(f"sample {key}: meta with a 'source' (provenance) field is required")
    out["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return out


def encode_rgb(img: Any, key: str = "?", name: str = "rgb", images: ImageEncoding = PNG) -> bytes:
    """uint8 (H, W, 3) image -> the bytes of an ``rgb*.png`` (or ``.jpg``) member (the one RGB
    encoder, so compact shards' shared frames are byte-identical to the members of plain shards)."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise SchemaError(f"sample {key}: {name} must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    if images.format == "png":
        return _rgb_png_bytes(np.ascontiguousarray(img))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(images.quality), subsampling=0)
    return buf.getvalue()


def encode_flow(flow: Any, key: str = "?") -> bytes:
    """(H, W, 3) float flow (u, v, valid) -> ``flow.npz`` bytes (1/64-px int16 + uint8 validity).
    A valid pixel's flow must be finite and within +-FLOW_MAX; invalid pixels are clipped."""
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim != 3 or flow.shape[2] != 3:
        raise SchemaError(f"sample {key}: flow must be (H, W, 3), got {flow.shape}")
    valid = flow[..., 2] > 0.5
    uv = flow[..., :2]
    bad = valid[..., None] & ~(np.abs(uv) <= FLOW_MAX)  # catches nan too
    if bad.any():
        worst = float(np.abs(uv[bad]).max())  # nan if any is nan
        raise SchemaError(f"sample {key}: valid flow must be finite and within +-{FLOW_MAX:.1f} px "
                          f"(got {worst} at {int(bad.any(axis=2).sum())} pixels)")
    fixed = np.clip(np.round(np.nan_to_num(uv) * FLOW_SCALE), -32767, 32767).astype(np.int16)
    buf = io.BytesIO()
    np.savez_compressed(buf, uv=np.ascontiguousarray(fixed.transpose(2, 0, 1)), valid=valid.astype(np.uint8))
    return buf.getvalue()


def _npy_shape(f: Any) -> tuple[int, ...]:
    """The shape in a ``.npy`` stream's header (the data is not read)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)[0]
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)[0]
    raise SchemaError(f"unsupported .npy format version {version}")


def check_flow_hw(data: bytes, expected_hw: Optional[tuple[int, int]], legacy_npy: bool = False) -> None:
    """Check a flow member's array size from its headers before its (compressed) data is read."""
    try:
        if legacy_npy:
            shape = _npy_shape(io.BytesIO(data))[:2]
        else:
            with zipfile.ZipFile(io.BytesIO(data)) as z, z.open("uv.npy") as f:
                shape = _npy_shape(f)[1:]
    except (KeyError, ValueError, zipfile.BadZipFile) as e:
        raise SchemaError(f"unreadable array header ({e})") from None
    if len(shape) == 2:
        check_image_hw((int(shape[0]), int(shape[1])), expected_hw, "array header")


def decode_flow(data: bytes, legacy_npy: bool = False) -> np.ndarray:
    """``flow.npz`` (or a schema v1 ``flow.npy``) bytes -> float32 (3, H, W) = (u, v, valid)."""
    if legacy_npy:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype != np.float32 or arr.ndim != 3 or arr.shape[2] != 3:
            raise SchemaError(f"expected float32 (H, W, 3), got {arr.dtype} {arr.shape}")
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        if set(z.files) != {"uv", "valid"}:
            raise SchemaError(f"expected arrays uv and valid, got {sorted(z.files)}")
        uv, valid = z["uv"], z["valid"]
    if uv.dtype != np.int16 or uv.ndim != 3 or uv.shape[0] != 2 or valid.dtype != np.uint8 \
            or valid.shape != uv.shape[1:]:
        raise SchemaError(f"expected uv int16 (2, H, W) and valid uint8 (H, W), got {uv.dtype} {uv.shape} "
                          f"and {valid.dtype} {valid.shape}")
    out = np.empty((3, *valid.shape), np.float32)
    out[:2] = uv.astype(np.float32) / FLOW_SCALE
    out[2] = valid
    return out


def decode_png(data: bytes, expected_hw: Optional[tuple[int, int]] = None) -> np.ndarray:
    """PNG bytes -> numpy array keeping the bit depth (webdataset's decoder would drop 16 bits). The size
    in its header is checked first (:func:`check_image_hw`); so is what PIL reads for another format."""
    header = png_header_hw(data)
    if header is not None:
        check_image_hw(header, expected_hw)
    with Image.open(io.BytesIO(data)) as im:
        check_image_hw((im.height, im.width), expected_hw, f"{im.format or 'image'} header")
        im.load()
        if im.mode == "I;16" or im.mode == "I;16B":
            return np.asarray(im, dtype=np.uint16)
        if im.mode == "I":
            return np.asarray(im).astype(np.uint16)
        return np.array(im)  # a writable copy: tensors made from it may be changed in place


_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def jpeg_header_hw(data: bytes) -> Optional[tuple[int, int]]:
    """(height, width) from a JPEG's frame header (SOF marker), without decoding; None when
    ``data`` is no JPEG or has no frame header before its end."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + length
    return None


def check_rgb_header(data: bytes, expected_hw: Optional[tuple[int, int]] = None, jpeg: bool = False) -> tuple[int, int]:
    """The (height, width) an ``rgb*.png`` (``jpeg``: ``rgb*.jpg``) member's header gives, checked
    (:func:`check_image_hw`; a PNG must say 8-bit RGB) before any pixel is decoded."""
    hw = jpeg_header_hw(data) if jpeg else png_header_hw(data)
    if hw is None:
        raise SchemaError("not a JPEG (no SOI marker or frame header)" if jpeg else "not a PNG (no signature or IHDR chunk)")
    check_image_hw(hw, expected_hw, "JPEG header" if jpeg else "PNG header")
    if not jpeg and (data[24] != 8 or data[25] != 2):
        raise SchemaError(f"expected 8-bit RGB, the PNG header says bit depth {data[24]}, colour type {data[25]}")
    return hw


def decode_rgb(data: bytes, expected_hw: Optional[tuple[int, int]] = None, jpeg: bool = False) -> "torch.Tensor":
    """An ``rgb*.png`` (``jpeg``: ``rgb*.jpg``) member -> uint8 tensor (3, H, W), decoded by
    torchvision.io (libpng / libjpeg-turbo) straight into the channels-first layout, after
    :func:`check_rgb_header`."""
    import torch  # not at module level: the CLI and the trainer's config checks import this module
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png as tv_decode_png

    check_rgb_header(data, expected_hw, jpeg)
    if jpeg:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return tv_decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)


@dataclass(frozen=True)
class EncodedImage:
    """An RGB member left encoded for the trainer to decode on its device (``decode_sample(...,
    encoded_rgb=True)``, ``data.decode_on=device``): its bytes, header-checked as :func:`decode_rgb`
    checks them, and whether the sample was mirrored since (the decoder flips it after decoding)."""

    data: bytes
    jpeg: bool
    hw: tuple[int, int]
    flipped: bool = False


def decode_sample(raw: dict[str, Any], where: str = "", image_hw: Optional[tuple[int, int]] = None,
                  encoded_rgb: bool = False) -> dict[str, Any]:
    """Raw tar members (bytes) -> tensors of the documented dtypes.

    ``where`` names the shard for error messages. Unknown keys are an error (never dropped
    silently). ``image_hw``: the split's image size (:func:`declared_image_hw`), checked in every
    image's header before it is decoded. Returns ``__key__``, the schema keys without extension
    (``rgb``, ``depth``, ``seg``, ``flow``, ...), ``meta``, and from it ``K`` (float32 (3, 3)) and
    ``baseline`` (float32 scalar, metres) and ``label`` (int64 scalar) when the meta has them.
    ``encoded_rgb``: the RGB members are only header-checked and returned as :class:`EncodedImage`.
    """
    import torch

    key = raw.get("__key__", "?")
    out: dict[str, Any] = {"__key__": key}
    for name, data in raw.items():
        if name.startswith("__"):
            continue
        try:
            if name in RGB_KEYS and encoded_rgb:
                jpeg = name.endswith(".jpg")
                out[name[:-4]] = EncodedImage(bytes(data), jpeg, check_rgb_header(data, image_hw, jpeg))
            elif name in RGB_KEYS:
                out[name[:-4]] = decode_rgb(data, image_hw, jpeg=name.endswith(".jpg"))
            elif name == "depth.png":
                arr = decode_png(data, image_hw)
                if arr.dtype != np.uint16 or arr.ndim != 2:
                    raise SchemaError(f"expected 16-bit grayscale, got {arr.dtype} {arr.shape}")
                out["depth"] = torch.from_numpy(arr.astype(np.float32) / DEPTH_PNG_SCALE)[None]
            elif name == "seg.png":
                arr = decode_png(data, image_hw)
                if arr.dtype != np.uint8 or arr.ndim != 2:
                    raise SchemaError(f"expected 8-bit grayscale, got {arr.dtype} {arr.shape}")
                out["seg"] = torch.from_numpy(np.array(arr, copy=True))
            elif name in ("flow.npz", "flow.npy"):
                check_flow_hw(data, image_hw, legacy_npy=name == "flow.npy")
                out["flow"] = torch.from_numpy(decode_flow(data, legacy_npy=name == "flow.npy"))
            elif name == "json":
                meta = json.loads(data.decode("utf-8"))
                out["meta"] = meta
                if "K" in meta:
                    out["K"] = torch.tensor(meta["K"], dtype=torch.float32).reshape(3, 3)
                if "baseline_m" in meta:
                    out["baseline"] = torch.tensor(float(meta["baseline_m"]), dtype=torch.float32)
                if "label" in meta:
                    out["label"] = torch.tensor(int(meta["label"]), dtype=torch.int64)
            else:
                raise SchemaError(f"unknown key (schema v{SCHEMA_VERSION} keys: {', '.join(KNOWN_KEYS)})")
        except SchemaError as e:
            raise SchemaError(f"{where}: sample {key}, member {key}.{name}: {e}") from None
        except Exception as e:  # corrupt bytes: PIL / numpy / json errors
            raise SchemaError(f"{where}: sample {key}, member {key}.{name}: cannot decode ({e})") from e
    return out
