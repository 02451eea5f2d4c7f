"""Devices, distribution strategy and numeric precision: where every runtime flag takes effect."""

import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from ranet.config import RuntimeConfig

_POLICIES = {"fp32": "float32", "mixed_float16": "mixed_float16",
             "mixed_bfloat16": "mixed_bfloat16"}


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


def set_precision(precision: str) -> None:
    """Sets the global Keras dtype policy; models must be built afterwards."""
    keras.mixed_precision.set_global_policy(_POLICIES[precision])


def _local_devices(config: RuntimeConfig):
    gpus = tf.config.list_logical_devices("GPU")
    if config.num_cpu_devices:
        return [d.name for d in tf.config.list_logical_devices("CPU")][:config.num_cpu_devices]
    if config.num_gpus:
        if config.num_gpus > len(gpus):
            raise ValueError(f"--num_gpus={config.num_gpus} but this machine has {len(gpus)} "
                             "GPU(s). Pass --num_gpus=0 to use all of them.")
        return [d.name for d in gpus][:config.num_gpus]
    return [d.name for d in gpus] or ["/cpu:0"]


def _all_reduce(config: RuntimeConfig):
    implementation = {"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
                      "ring": tf.distribute.experimental.CommunicationImplementation.RING,
                      "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL}
    return tf.distribute.experimental.CommunicationOptions(
        implementation=implementation[config.all_reduce])


def create_strategy(config: RuntimeConfig) -> tf.distribute.Strategy:
    """The tf.distribute strategy named by ``--strategy``."""
    if config.strategy == "default":
        return tf.distribute.get_strategy()
    if config.strategy == "one_device":
        return tf.distribute.OneDeviceStrategy(_local_devices(config)[0])
    if config.strategy == "mirrored":
        return tf.distribute.MirroredStrategy(_local_devices(config))
    if config.strategy == "multi_worker_mirrored":
        if "TF_CONFIG" not in os.environ and "SLURM_JOB_ID" not in os.environ:
            raise ValueError("--strategy=multi_worker_mirrored needs the cluster in TF_CONFIG "
                             "(or a Slurm allocation); see launch/README.md")
        resolver = (tf.distribute.cluster_resolver.TFConfigClusterResolver()
                    if "TF_CONFIG" in os.environ
                    else tf.distribute.cluster_resolver.SlurmClusterResolver())
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=_all_reduce(config))
    if config.strategy == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"Unknown strategy. Received: strategy={config.strategy!r}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the real checkpoints and summaries."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


class WorkerDirectory:
    """The model directory for the chief; a throw-away directory for other workers.

    Every worker must take part in saving a checkpoint (mirrored variables are
    read collectively), but only the chief's copy is kept.
    """

    def __init__(self, model_dir: str, chief: bool):
        self.chief = chief
        self.path = model_dir if chief else tempfile.mkdtemp(prefix="ranet_worker_")

    def cleanup(self) -> None:
        if not self.chief:
            shutil.rmtree(self.path, ignore_errors=True)


def describe(strategy: tf.distribute.Strategy, config: RuntimeConfig) -> str:
    return json.dumps({"strategy": type(strategy).__name__,
                       "replicas": strategy.num_replicas_in_sync,
                       "precision": config.precision, "xla": config.xla,
                       "tensorflow": tf.__version__})
