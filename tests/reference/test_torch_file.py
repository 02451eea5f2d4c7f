"""The torch-free reader of torch.save files: real reference checkpoints, and crafted ones."""

import lzma
import pickle
import zipfile

import numpy as np
import pytest

from ranet.reference import torch_file
from tests.helpers import REPO_ROOT

TINY = REPO_ROOT / "tests" / "fixtures" / "reference" / "tiny"


def unpacked(tmp_path, name: str) -> str:
    """A committed fixture checkpoint, decompressed (they are kept as .xz)."""
    path = tmp_path / name
    path.write_bytes(lzma.decompress((TINY / f"{name}.xz").read_bytes()))
    return str(path)


def expected_shapes() -> dict:
    shapes = {}
    for line in (TINY / "state_dict_shapes.txt").read_text().splitlines():
        key, shape, _ = line.split("\t")
        shapes[key] = tuple(int(n) for n in shape.strip("[]").split(",") if n.strip())
    return shapes


def test_zip_checkpoint_reads_as_the_reference_saved_it(tmp_path):
    checkpoint = torch_file.read(unpacked(tmp_path, "checkpoint.pth.tar"))
    assert set(checkpoint) == {"epoch", "arch", "state_dict", "best_prec1", "optimizer"}
    assert checkpoint["arch"] == "RANet" and checkpoint["epoch"] == 0
    state_dict = checkpoint["state_dict"]
    assert list(state_dict) == list(expected_shapes())  # the saved order, too
    assert {k: v.shape for k, v in state_dict.items()} == expected_shapes()
    batches = state_dict["module.FirstLayer.layers.0.net.1.num_batches_tracked"]
    assert batches.dtype == np.int64 and int(batches) == 20  # the fixture's 20 training steps
    variance = state_dict["module.FirstLayer.layers.0.net.1.running_var"]
    assert variance.dtype == np.float32 and not np.allclose(variance, 1.0)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.05


def test_legacy_checkpoint_holds_the_same_tensors(tmp_path):
    new = torch_file.read(unpacked(tmp_path, "checkpoint.pth.tar"))["state_dict"]
    legacy = torch_file.read(unpacked(tmp_path, "legacy_checkpoint.pth.tar"))["state_dict"]
    assert list(legacy) == list(new)
    for key in new:
        np.testing.assert_array_equal(legacy[key], new[key], err_msg=key)


class _RunsCode:
    """Unpickling this calls ``os.system`` in an unrestricted unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def _zip_with_pickle(path, payload: bytes) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return str(path)


def test_a_crafted_zip_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"state_dict": {"x": _RunsCode(marker)}}, protocol=2)
    path = _zip_with_pickle(tmp_path / "evil.pth", payload)
    with pytest.raises(torch_file.UnsafeCheckpointError, match="asks for posix.system"):
        torch_file.read(path)
    assert not marker.exists()


def test_a_crafted_legacy_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    content = (pickle.dumps(torch_file.LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
               + pickle.dumps({"little_endian": True}, protocol=2)
               + pickle.dumps(_RunsCode(marker), protocol=2))
    path = tmp_path / "evil_legacy.pth"
    path.write_bytes(content)
    with pytest.raises(torch_file.UnsafeCheckpointError, match="system"):
        torch_file.read(str(path))
    assert not marker.exists()


def test_builtins_that_run_code_are_refused_too(tmp_path):
    # GLOBAL builtins.eval, then REDUCE: the classic payload, written opcode by opcode.
    payload = b"\x80\x02cbuiltins\neval\nX\x08\x00\x00\x001 + 1 + 1\x85R."
    with pytest.raises(torch_file.UnsafeCheckpointError, match="builtins.eval"):
        torch_file.read(_zip_with_pickle(tmp_path / "eval.pth", payload))


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "neither a zip archive nor a legacy pickle"),
    (b"PK\x03\x04 truncated", "damaged zip archive"),
    (pickle.dumps(12345, protocol=2), "neither a zip archive nor a legacy PyTorch file"),
])
def test_files_that_are_not_checkpoints_say_so(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(torch_file.CheckpointFormatError, match=message):
        torch_file.read(str(path))


def test_a_truncated_legacy_checkpoint_is_an_error_not_zeros(tmp_path):
    content = (TINY / "legacy_checkpoint.pth.tar.xz").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(lzma.decompress(content)[:-1000])
    with pytest.raises(torch_file.CheckpointFormatError, match="truncated"):
        torch_file.read(str(path))


def test_a_zip_missing_a_storage_names_it(tmp_path):
    source = unpacked(tmp_path, "checkpoint.pth.tar")
    damaged = tmp_path / "missing.pth"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(damaged, "w") as copy:
        names = original.namelist()
        dropped = next(name for name in names if "/data/" in name)
        for name in names:
            if name != dropped:
                copy.writestr(name, original.read(name))
    with pytest.raises(torch_file.CheckpointFormatError, match=f"lacks the storage {dropped}"):
        torch_file.read(str(damaged))


def test_strided_views_are_rebuilt_element_for_element():
    storage = np.arange(12, dtype=np.float32)
    # A transposed 3x4 view (what tensor.t() saves): size (4, 3), stride (1, 4).
    np.testing.assert_array_equal(torch_file._rebuild_tensor(storage, 0, (4, 3), (1, 4)),
                                  storage.reshape(3, 4).T)
    np.testing.assert_array_equal(torch_file._rebuild_tensor(storage, 2, (), ()), 2.0)
    with pytest.raises(torch_file.CheckpointFormatError, match="outside its storage"):
        torch_file._rebuild_tensor(storage, 6, (4, 3), (1, 4))
