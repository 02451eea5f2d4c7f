"""Shared pytest set-up: the tiers, two logical CPU devices, the real data fixture, float32.

The host CPU is split into two logical devices before any test touches
TensorFlow, so MirroredStrategy can be tested in-process: TensorFlow freezes
its device list at the first op. Helpers shared by tests live in ``helpers.py``; which
tier a plain run selects, in ``tiers.py``.
"""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

pytest_plugins = ["tiers"]

NUM_TEST_CPU_DEVICES = 2
_REPO_ROOT = Path(__file__).resolve().parents[1]

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * NUM_TEST_CPU_DEVICES)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches (the ImageNet record index) go to a scratch folder, not the user's ~/.cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def real_cifar10() -> Path:
    """The shared real CIFAR-10 folder, or a skip when this checkout has none beside it."""
    for candidate in (_REPO_ROOT.parent / "shared" / "data" / "cifar-10-batches-py",
                      Path("/work/shared/data/cifar-10-batches-py")):
        if (candidate / "data_batch_1").is_file():
            return candidate
    pytest.skip("real CIFAR-10 (../shared/data/cifar-10-batches-py) is not present")


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends under float32, even if one fails inside a mixed policy."""
    import keras
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")
