"""ranet.jsonio: infinities as strings, atomic writes, errors that name the file."""

import json
import math

import numpy as np
import pytest

from ranet import jsonio


def test_numbers_keep_finite_values_and_spell_infinities():
    assert [jsonio.number(v) for v in (0.5, math.inf, -math.inf, np.float32(2))] == [
        0.5, "inf", "-inf", 2.0]
    assert [float(jsonio.number(v)) for v in (math.inf, -math.inf)] == [math.inf, -math.inf]
    with pytest.raises(ValueError, match="NaN"):
        jsonio.number(math.nan)


def test_write_is_strict_takes_numpy_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out.json"
    jsonio.write(str(path), {"a": np.int64(3), "b": np.arange(2), "c": np.float32(0.5)})
    assert json.loads(path.read_text()) == {"a": 3, "b": [0, 1], "c": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with pytest.raises(ValueError):
        jsonio.write(str(path), {"x": math.inf})
    assert json.loads(path.read_text())["a"] == 3  # the old content survived the failure


def test_read_names_a_corrupt_file_and_says_how_to_fix_it(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"a": 1,')
    with pytest.raises(ValueError, match=r"state\.json is not valid JSON .*Delete it\."):
        jsonio.read(str(path), "Delete it.")
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"not a text file"):
        jsonio.read(str(path), "Delete it.")
