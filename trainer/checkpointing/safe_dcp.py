"""Read torch.distributed.checkpoint metadata without running code from the checkpoint folder.

DCP's ``FileSystemReader`` unpickles ``<checkpoint>/dcp/.metadata`` with plain ``pickle``: a
crafted file (with a matching ``COMPLETE.json``, which anyone who can write the folder can make)
would run arbitrary code on auto-resume. :class:`SafeFileSystemReader` reads it through an
unpickler that resolves only the classes DCP's metadata is made of (listed below) and refuses
anything else, naming the file and the global it asked for. Tensor data files are already read
by DCP with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

#: module -> names a DCP ``.metadata`` pickle may reference (torch dtypes are allowed separately)
ALLOWED_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint's metadata asked for something that is not checkpoint metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to load {module}.{name} — DCP metadata holds only checkpoint metadata "
            "types, so this file was not written by torch.distributed.checkpoint (it could run code). "
            "Delete the checkpoint or restore it from a trusted copy")


def load_metadata(path: str, data: bytes) -> Metadata:
    """Unpickle DCP metadata ``data`` (read from ``path``) allowing only :data:`ALLOWED_GLOBALS`."""
    try:
        metadata = _MetadataUnpickler(data, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated / garbage bytes
        raise UnsafeCheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def check_metadata(dcp_dir: str | Path) -> Metadata:
    """Read ``<dcp_dir>/.metadata`` safely before DCP does (DCP wraps reader errors in its own
    exception with every rank's traceback; this raises ours, naming the file)."""
    path = Path(dcp_dir) / ".metadata"
    if not path.is_file():
        raise UnsafeCheckpointError(f"{path}: missing (not a torch.distributed.checkpoint folder)")
    return load_metadata(str(path), path.read_bytes())


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by :func:`load_metadata` (no arbitrary code)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(str(path), f.read())
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
