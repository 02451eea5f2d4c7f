"""What the server tests share: the tiny RANet exported to LiteRT once per test process."""

from types import SimpleNamespace

import pytest

from helpers import SYNTHETIC_DATA, write_model_dir
from ranet import data
from ranet.inference.serving import litert
from ranet.inference.serving.exporting import ExportOptions


@pytest.fixture(scope="session")
def served_export(tmp_path_factory):
    """The tiny 3-exit RANet (exits sharpened so that images leave at every exit), its
    fp32 LiteRT export, and the synthetic splits it was calibrated on."""
    root = tmp_path_factory.mktemp("served")
    model = write_model_dir(root / "run", logit_scale=6.0)
    manifest = litert.export(ExportOptions(
        model_dir=str(root / "run"), export_dir=str(root / "export"), format="litert",
        litert_precision=("fp32",), representative_images=64))
    return SimpleNamespace(export_dir=root / "export", manifest=manifest, model=model,
                           splits=data.load_splits(SYNTHETIC_DATA))
