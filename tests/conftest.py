"""Shared pytest setup.

The host CPU is split into two logical devices before any test touches
TensorFlow, so MirroredStrategy can be tested in-process: TensorFlow freezes
its device list at the first op.
"""

import glob
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


def event_scalars(model_dir, subdir="train") -> dict:
    """{tag: {step: value}} from the TensorBoard event files of one writer of a model dir."""
    values = {}
    for path in sorted(glob.glob(os.path.join(str(model_dir), subdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") \
                    else value.simple_value
                values.setdefault(value.tag, {})[event.step] = number
    return values


@pytest.fixture
def real_cifar10() -> Path:
    """The shared real CIFAR-10 folder, or a skip when this checkout has none beside it."""
    for candidate in (REPO_ROOT.parent / "shared" / "data" / "cifar-10-batches-py",
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


def _shared_configs():
    """A 3-exit RANet (0.6 M parameters) and synthetic data, shared by the inference tests."""
    from ranet import config as config_lib
    return (config_lib.ModelConfig(
                name="ranet", num_classes=10, scale_list=(1, 2, 3), growth_factors=(4, 2, 1),
                bottleneck_factors=(4, 2, 1), base_channels=8, growth_rate=4, num_blocks=1,
                block_step=1, step=2),
            config_lib.DataConfig(dataset="synthetic", synthetic_train_size=512,
                                  synthetic_test_size=64, validation_size=128))


TINY_RANET, SYNTHETIC_DATA = _shared_configs()


def write_model_dir(model_dir, model_config=TINY_RANET, data_config=SYNTHETIC_DATA,
                    with_checkpoint=True, logit_scale=1.0):
    """A model directory as ranet.train leaves it, without training: config.json and
    (optionally) one checkpoint of a seeded model whose exit kernels are multiplied by
    ``logit_scale`` (random exits give near-uniform softmaxes; sharpened, confidences spread).
    Returns the model, or None without a checkpoint."""
    import keras

    from ranet import checkpoints
    from ranet import config as config_lib
    from ranet.models import get_model

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save(config_lib.ExperimentConfig(
        data=data_config, model=model_config, optim=config_lib.OptimConfig(),
        runtime=config_lib.RuntimeConfig(model_dir=str(model_dir))), str(model_dir))
    if not with_checkpoint:
        return None
    keras.utils.set_random_seed(0)
    model = get_model(model_config)
    for stage in model.stages:
        for layer in stage.layers:
            if isinstance(layer, keras.layers.Dense):
                layer.kernel.assign(layer.kernel * logit_scale)
    tf.train.CheckpointManager(tf.train.Checkpoint(**checkpoints.trackables(model)),
                               str(model_dir / "checkpoints"), max_to_keep=1).save(checkpoint_number=1)
    return model
