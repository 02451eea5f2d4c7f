"""Shared pytest setup.

The host CPU is split into two logical devices before any test touches
TensorFlow, so MirroredStrategy can be tested in-process: TensorFlow freezes
its device list at the first op.
"""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_TEST_CPU_DEVICES = 2
REPO_ROOT = Path(__file__).resolve().parents[1]

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * NUM_TEST_CPU_DEVICES)


@pytest.fixture
def real_cifar10() -> Path:
    """The shared real CIFAR-10 folder, or a skip when this checkout has none beside it."""
    for candidate in (REPO_ROOT.parent / "shared" / "data" / "cifar-10-batches-py",
                      Path("/work/shared/data/cifar-10-batches-py")):
        if (candidate / "data_batch_1").is_file():
            return candidate
    pytest.skip("real CIFAR-10 (../shared/data/cifar-10-batches-py) is not present")
