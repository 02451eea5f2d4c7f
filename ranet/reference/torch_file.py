"""Reads what ``torch.save`` wrote, without PyTorch, and without running code from the file.

A PyTorch file is a pickle whose tensors point at raw storages kept beside it: in a zip
archive (``<name>/data.pkl`` and ``<name>/data/<key>``, the default since torch 1.6) or,
in the legacy format, as a sequence of pickles followed by the storages' bytes. A pickle
can name any importable callable and call it; the unpicklers here resolve only the names a
checkpoint of tensors and plain containers needs (``ALLOWED_GLOBALS``) to local
functions that build numpy arrays, and refuse every other name before anything runs.
Tensors come back as numpy arrays, in the nesting of the saved object.
"""

import collections
import io
import pickle
import struct
import zipfile
from typing import Any, Callable, Dict, Tuple

import numpy as np

from ranet.errors import UsageError

# The first pickle of a legacy file is this number (torch/serialization.py, MAGIC_NUMBER).
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ZIP_SIGNATURE = b"PK\x03\x04"

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}


class UnsafeCheckpointError(UsageError):
    """The file asks to run something other than rebuilding tensors and containers."""


class CheckpointFormatError(UsageError):
    """The file is not a PyTorch checkpoint this reader understands."""


class _StorageType:
    """Stands for ``torch.<X>Storage``: the element type of a storage."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _as_numpy_dtype(dtype) -> np.dtype:
    if dtype == "bfloat16":
        raise CheckpointFormatError("bfloat16 tensors are not supported: convert the "
                                    "checkpoint to float32 first (tensor.float()).")
    return np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Tuple[int, ...],
                    stride: Tuple[int, ...], *_unused) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a strided view of a storage (copied out by ``read``)."""
    size, stride = tuple(size), tuple(stride)
    if min(size, default=1) > 0:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
            raise CheckpointFormatError(f"a tensor of size {size} and stride {stride} at "
                                        f"offset {offset} reaches outside its storage of "
                                        f"{storage.size} elements")
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride])


def _rebuild_parameter(data: np.ndarray, *_unused) -> np.ndarray:
    return data


def _ordered_dict(*args) -> collections.OrderedDict:
    return collections.OrderedDict(*args)


ALLOWED_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``ALLOWED_GLOBALS``; ``load_storage`` turns a storage id into an array."""

    def __init__(self, stream, load_storage: Callable[[tuple], np.ndarray]):
        super().__init__(stream)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"the checkpoint asks for {module}.{name}, which a file of tensors never "
                "needs; refusing to load it (only tensors, storages and plain containers are "
                "read). If it came from a source you trust, load it with torch and save its "
                "state_dict again.") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"unknown persistent id {pid!r:.80}")
        storage_type = pid[1]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"a storage of unknown type {storage_type!r:.80}")
        return self._load_storage(pid[2], _as_numpy_dtype(storage_type.dtype), int(pid[4]), pid)


def _no_storage(*_unused):
    raise CheckpointFormatError("a tensor where the format has none")


def _unpickle(stream, load_storage=_no_storage):
    try:
        return _RestrictedUnpickler(stream, load_storage).load()
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except Exception as error:  # noqa: BLE001 - any malformed pickle
        raise CheckpointFormatError(f"malformed pickle ({type(error).__name__}: {error})") \
            from error


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointFormatError(
                f"{path} is a zip archive but not one torch.save wrote (it needs exactly one "
                "<name>/data.pkl)")
        root = pickles[0][:-len("data.pkl")]
        if f"{root}byteorder" in names and archive.read(f"{root}byteorder") != b"little":
            raise CheckpointFormatError(f"{path} was saved on a big-endian machine")
        storages = {}

        def load_storage(key, dtype, numel, _pid):
            if key not in storages:
                entry = f"{root}data/{key}"
                if entry not in names:
                    raise CheckpointFormatError(f"{path} lacks the storage {entry}")
                raw = archive.read(entry)
                if len(raw) < numel * dtype.itemsize:
                    raise CheckpointFormatError(f"storage {entry} of {path} is truncated")
                storages[key] = np.frombuffer(raw, dtype, count=numel)
            return storages[key]

        return _unpickle(io.BytesIO(archive.read(pickles[0])), load_storage)


def _read_legacy(path: str, stream) -> Any:
    """The pre-1.6 format: magic number, protocol version and system-info pickles, the object
    pickle, a pickle of the storage keys, then each storage as its element count and bytes."""
    if _unpickle(stream) != LEGACY_MAGIC:
        raise CheckpointFormatError(f"{path} is neither a zip archive nor a legacy PyTorch file")
    version = _unpickle(stream)
    if version != 1001:
        raise CheckpointFormatError(f"{path}: legacy protocol version {version!r}, not 1001")
    system = _unpickle(stream)
    if isinstance(system, dict) and not system.get("little_endian", True):
        raise CheckpointFormatError(f"{path} was saved on a big-endian machine")
    # Storages are declared while the object pickle loads and filled after it: the tensors
    # are views of them until ``read`` copies them out.
    storages = {}

    def declare_storage(key, dtype, numel, pid):
        if len(pid) > 5 and pid[5] is not None:
            raise CheckpointFormatError(f"{path}: storage views (torch < 1.0) are not supported")
        if key not in storages:
            storages[key] = np.zeros(numel, dtype)
        return storages[key]

    obj = _unpickle(stream, declare_storage)
    keys = _unpickle(stream)
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise CheckpointFormatError(f"{path}: its list of storages does not match its tensors")
    for key in keys:
        array = storages[key]
        header = stream.read(8)
        numel = struct.unpack("<q", header)[0] if len(header) == 8 else -1
        raw = stream.read(array.nbytes)
        if numel != array.size or len(raw) != array.nbytes:
            raise CheckpointFormatError(f"{path} is truncated or corrupt (storage {key})")
        array[:] = np.frombuffer(raw, array.dtype)
    return obj


def _copied(obj):
    """``obj`` with every array copied out of its storage (writable, independent)."""
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        copy = type(obj)((key, _copied(value)) for key, value in obj.items())
        return copy
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copied(value) for value in obj)
    return obj


def read(path: str) -> Any:
    """The object ``torch.save`` wrote to ``path``, tensors as numpy arrays.

    Raises ``FileNotFoundError``, ``UnsafeCheckpointError`` (the file names something other
    than tensors and containers: nothing of it ran) or ``CheckpointFormatError``.
    """
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head == _ZIP_SIGNATURE:
            try:
                return _copied(_read_zip(path))
            except zipfile.BadZipFile as error:
                raise CheckpointFormatError(f"{path} is a damaged zip archive ({error})") \
                    from error
        if head[:1] == b"\x80":
            return _copied(_read_legacy(path, f))
    raise CheckpointFormatError(
        f"{path} is not a file torch.save writes (neither a zip archive nor a legacy pickle); "
        "pass the .pth/.pth.tar file the reference's main.py saved.")
