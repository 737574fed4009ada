"""Label tables: Cityscapes label id <-> train id, and NYU-Depth V2's 894 -> 40 -> 13 classes.

The Cityscapes table is the official one (cityscapesScripts ``helpers/labels.py``): 19
evaluated classes get train ids 0..18, every other label id maps to 255 (ignore). NYU's
894 -> 40 mapping (Gupta et al., ``classMapping40.mat``) is supplied by the user as a file;
the 40 -> 13 mapping (Couprie et al. / ``class13Mapping.mat``) is a fixed table here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_shards.schema import CITYSCAPES_CLASSES, IGNORE_INDEX

#: (name, label id, train id) for every Cityscapes label id 0..33; license plate (-1) omitted.
CITYSCAPES_LABELS: tuple[tuple[str, int, int], ...] = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9),
    ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14),
    ("bus", 28, 15), ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16),
    ("motorcycle", 32, 17), ("bicycle", 33, 18),
)


def _labelid_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for _, label_id, train_id in CITYSCAPES_LABELS:
        lut[label_id] = train_id
    return lut


def _trainid_lut() -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)  # ignore (255) and anything unknown -> 0 "unlabeled"
    for _, label_id, train_id in CITYSCAPES_LABELS:
        if train_id != IGNORE_INDEX:
            lut[train_id] = label_id
    return lut


LABELID_TO_TRAINID = _labelid_lut()
TRAINID_TO_LABELID = _trainid_lut()
assert [n for n, _, t in sorted(CITYSCAPES_LABELS, key=lambda r: r[2]) if t != 255] == list(CITYSCAPES_CLASSES)


def labelid_to_trainid(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes label ids (uint8 image) -> train ids 0..18, 255 for every non-evaluated label."""
    arr = np.asarray(label_ids)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"label ids must lie in 0..255, got {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8)
    return LABELID_TO_TRAINID[arr]


def trainid_to_labelid(train_ids: np.ndarray) -> np.ndarray:
    """Train ids 0..18 (255 ignore) -> Cityscapes label ids, as the official evaluation expects."""
    arr = np.asarray(train_ids)
    bad = (arr < 0) | ((arr > 18) & (arr != IGNORE_INDEX))
    if np.any(bad):
        raise ValueError(f"train ids must be 0..18 or 255, got {np.unique(arr[bad])[:5].tolist()}")
    return TRAINID_TO_LABELID[arr.astype(np.uint8)]


# --------------------------------------------------------------------------- NYU-Depth V2

NYU40_CLASSES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)
NYU13_CLASSES: tuple[str, ...] = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
    "table", "tv", "wall", "window",
)
#: NYU40 id (0 = unlabeled, 1..40) -> NYU13 id (0 = unlabeled, 1..13), from class13Mapping.mat.
NYU40_TO_13 = np.array([0, 12, 5, 6, 1, 4, 9, 10, 12, 13, 6, 8, 6, 13, 10, 6, 13, 6, 7, 7, 5, 7, 3,
                        2, 6, 11, 7, 7, 7, 7, 7, 7, 6, 7, 7, 7, 7, 7, 7, 6, 7], dtype=np.int64)
NYU_NUM_RAW_CLASSES = 894


def load_nyu40_mapping(path: Path) -> np.ndarray:
    """Read the user's 894 -> 40 mapping: ``classMapping40.mat`` (``mapClass``), ``.npy`` or text.

    Returns an int64 array ``m`` of length 895 with ``m[0] = 0`` (unlabeled) and ``m[i]`` the
    NYU40 id (0..40) of raw class ``i`` (1..894).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected the NYU 894->40 class mapping "
                                "(classMapping40.mat with 'mapClass', a .npy, or a text file of 894 integers)")
    try:
        if path.suffix == ".mat":
            import scipy.io

            mat = scipy.io.loadmat(str(path))
            if "mapClass" not in mat:
                raise ValueError(f"no 'mapClass' variable (found: {sorted(k for k in mat if not k.startswith('__'))})")
            values = np.asarray(mat["mapClass"]).ravel()
        elif path.suffix == ".npy":
            values = np.load(path, allow_pickle=False).ravel()
        else:
            values = np.array(path.read_text().replace(",", " ").split(), dtype=np.float64)
    except (ValueError, OSError, NotImplementedError) as e:
        raise ValueError(f"{path}: cannot read the 894->40 class mapping ({e})") from e
    if values.size != NYU_NUM_RAW_CLASSES:
        raise ValueError(f"{path}: expected {NYU_NUM_RAW_CLASSES} entries (one per raw NYU class), got {values.size}")
    if np.any(values != np.round(values)) or values.min() < 0 or values.max() > 40:
        raise ValueError(f"{path}: entries must be integers in 0..40, got range {values.min()}..{values.max()}")
    return np.concatenate([[0], values.astype(np.int64)])


def nyu_raw_to_trainids(labels: np.ndarray, map40: np.ndarray, num_classes: int) -> np.ndarray:
    """Raw NYU labels (0 unlabeled, 1..894) -> train ids 0..C-1 (255 ignore) for C in {40, 13}."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > NYU_NUM_RAW_CLASSES):
        raise ValueError(f"raw NYU labels must lie in 0..{NYU_NUM_RAW_CLASSES}, got {labels.min()}..{labels.max()}")
    ids = map40[labels.astype(np.int64)]
    if num_classes == 13:
        ids = NYU40_TO_13[ids]
    elif num_classes != 40:
        raise ValueError(f"NYU classes must be 40 or 13, got {num_classes}")
    return np.where(ids > 0, ids - 1, IGNORE_INDEX).astype(np.uint8)
