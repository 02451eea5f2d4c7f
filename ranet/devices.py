"""What the process runs on: logical CPU devices, thread pools, the Keras precision policy,
and the facts stored beside every measurement (``cpu_name``, ``device_info``).

Shared by training and inference. Devices and thread pools must be set before TensorFlow
runs its first op; the precision policy before models are built.
"""

import contextlib
import os
import platform

import keras
import tensorflow as tf

from ranet.config import dtype_policy
from ranet.host import cpu_name


def configure_host_devices(num_cpu_devices: int) -> None:
    """Splits the host CPU into ``num_cpu_devices`` logical devices (0 leaves it alone).

    Must run before TensorFlow creates any op or variable: afterwards the
    device list is frozen ("Virtual devices cannot be modified after being
    initialized").
    """
    if num_cpu_devices <= 0:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    config = [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices
    try:
        tf.config.set_logical_device_configuration(cpu, config)
    except RuntimeError as error:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != num_cpu_devices:
            raise RuntimeError(
                f"--num_cpu_devices={num_cpu_devices} must be applied before TensorFlow "
                f"initialises its devices; it already has {existing} CPU device(s).") from error


def configure_threads(intra_op: int, inter_op: int) -> None:
    """Sizes TensorFlow's thread pools; 0 keeps its default (every core).

    Must run before TensorFlow executes its first op. At batch 1 RANet's convolutions
    are too small to split: one intra-op thread cut its full pass by 30% on a 2-core CPU,
    while ResNet50's got 32% slower (BUILD_NOTES.md, "Serving latency").
    """
    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError as error:
        raise RuntimeError("--intra_op_threads/--inter_op_threads must be applied before "
                           "TensorFlow runs its first op") from error


def set_precision(precision: str) -> None:
    """Sets the global Keras dtype policy; models must be built afterwards."""
    keras.mixed_precision.set_global_policy(dtype_policy(precision))


@contextlib.contextmanager
def precision_policy(precision: str):
    """Builds under ``precision`` inside, and puts the previous global policy back after."""
    previous = keras.mixed_precision.global_policy().name
    set_precision(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def device_info() -> dict:
    """Where the numbers were measured, to store beside them.

    ``intra_op_threads`` / ``inter_op_threads`` of 0 mean TensorFlow's default:
    all cores available to the process. ``"device"`` counts the cores this
    process may run on, which in a container can be fewer than ``cpu_count``.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = f"CPU: {cpu_name()}, {cores} cores"
    gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            for gpu in tf.config.list_physical_devices("GPU")]
    return {
        "device": f"GPU: {', '.join(gpus)}; {cpu}" if gpus else cpu,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
