"""Distribution: the tf.distribute strategy of ``--strategy``, and what workers must agree on."""

import json
import os
import zlib

import tensorflow as tf
from absl import logging

from ranet import config as config_lib
from ranet.config import RuntimeConfig
from ranet.errors import UsageError

# TensorFlow errors a collective raises when a peer dies, hangs or cannot be reached.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
               tf.errors.CancelledError, tf.errors.AbortedError)


def _local_devices(config: RuntimeConfig):
    gpus = tf.config.list_logical_devices("GPU")
    if config.num_cpu_devices:
        return [d.name for d in tf.config.list_logical_devices("CPU")][:config.num_cpu_devices]
    if config.num_gpus:
        if config.num_gpus > len(gpus):
            raise UsageError(f"--num_gpus={config.num_gpus} but this machine has {len(gpus)} "
                             "GPU(s). Pass --num_gpus=0 to use all of them.")
        return [d.name for d in gpus][:config.num_gpus]
    return [d.name for d in gpus] or ["/cpu:0"]


def _all_reduce(config: RuntimeConfig):
    """Collective options. A dead worker is noticed by the coordination service's heartbeats
    (about 10 s); the timeout also ends a wait on a worker that is alive but stuck."""
    implementation = {"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
                      "ring": tf.distribute.experimental.CommunicationImplementation.RING,
                      "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL}
    return tf.distribute.experimental.CommunicationOptions(
        implementation=implementation[config.all_reduce],
        timeout_seconds=config.collective_timeout_seconds or None)


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
            raise UsageError("--strategy=multi_worker_mirrored needs the cluster in TF_CONFIG "
                             "(or a Slurm allocation); see launch/README.md")
        resolver = (tf.distribute.cluster_resolver.TFConfigClusterResolver()
                    if "TF_CONFIG" in os.environ
                    else tf.distribute.cluster_resolver.SlurmClusterResolver())
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=_all_reduce(config))
    # "tpu", the last of config.STRATEGIES, which RuntimeConfig has checked.
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Processes taking part in training (1 unless multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    jobs = resolver.cluster_spec().as_dict()
    return sum(len(jobs.get(job, ())) for job in ("chief", "worker"))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the real checkpoints and summaries."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def task_name(strategy: tf.distribute.Strategy) -> str:
    """``<type>_<index>`` of this process in its cluster; ``worker_0`` outside one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "worker_0"
    return f"{resolver.task_type}_{resolver.task_id}"


def describe(strategy: tf.distribute.Strategy, config: RuntimeConfig) -> str:
    return json.dumps({"strategy": type(strategy).__name__,
                       "replicas": strategy.num_replicas_in_sync,
                       "precision": config.precision, "xla": config.xla,
                       "tensorflow": tf.__version__})


@tf.function
def _sums(strategy, values):
    """Sum over every replica of ``values`` and of their squares. ``values`` is one tensor
    (the same on every replica of this worker) or per-replica values."""
    per_replica = strategy.run(lambda v: tf.concat([v, v * v], axis=0), args=(values,))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)


@tf.function
def _from_replica_zero(strategy, value):
    """The first replica's ``value`` on every replica (``value`` as in ``_sums``)."""
    def contribution(value):
        first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
        return tf.where(first, value, tf.zeros_like(value))
    return strategy.reduce(tf.distribute.ReduceOp.SUM,
                           strategy.run(contribution, args=(value,)), axis=None)


def broadcast_from_chief(strategy: tf.distribute.Strategy, value: int) -> int:
    """The chief's ``value`` on every worker: the first replica in sync lives on the chief."""
    return int(_from_replica_zero(strategy, tf.constant(value, tf.int64)).numpy())


def config_fingerprint(config: config_lib.ExperimentConfig) -> int:
    """20 bits of what every worker must share: the whole configuration but --data_dir."""
    settings = config_lib.to_dict(config)
    settings["data"].pop("data_dir")  # each machine may read its own copy
    return zlib.crc32(json.dumps(settings, sort_keys=True).encode()) % 2**20


def check_workers_agree(strategy: tf.distribute.Strategy, config: config_lib.ExperimentConfig,
                        step: int) -> None:
    """Multi-worker: every worker must run the same configuration from the same step.

    Otherwise their collectives stop matching and they wait on each other until
    --collective_timeout_seconds.
    """
    fingerprint = config_fingerprint(config)
    _check_agreement(strategy, tf.constant([step, fingerprint], tf.int64), step)
    logging.info("the %d replicas agree on the configuration (fingerprint %05x) and the step "
                 "(%d)", strategy.num_replicas_in_sync, fingerprint, step)


def _check_agreement(strategy: tf.distribute.Strategy, values, step: int) -> None:
    """Raises unless ``values``, ``[step, fingerprint]`` on each replica (as in ``_sums``),
    are the same on all of them: n values agree iff n * sum(v**2) == sum(v)**2."""
    n = strategy.num_replicas_in_sync
    sums = _sums(strategy, values).numpy().tolist()
    (step_sum, fingerprint_sum), (step_squares, fingerprint_squares) = sums[:2], sums[2:]
    if n * fingerprint_squares != fingerprint_sum ** 2:
        raise UsageError("the workers were started with different flags; start every worker "
                         "with the same command (only TF_CONFIG and --data_dir may differ).")
    if n * step_squares != step_sum ** 2:
        raise UsageError(
            f"workers resumed from different steps (this one from {step}; the mean is "
            f"{step_sum / n:g}): every worker must read the chief's checkpoints, i.e. "
            "--model_dir must be the same shared folder on every worker.")


def peer_error_summary(error: tf.errors.OpError) -> str:
    """The informative tail of a collective's error, without the graph traceback."""
    tail = error.message.strip().split("\n\n")[-1]
    lines = [line.strip() for line in tail.splitlines()
             if line.strip() and not line.lstrip().startswith("[[")]
    summary = " ".join(lines)
    return summary if len(summary) <= 400 else summary[:400] + "..."


