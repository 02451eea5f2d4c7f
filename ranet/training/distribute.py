"""Devices, distribution strategy and numeric precision: where every runtime flag takes effect."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading

import keras
import tensorflow as tf
from absl import logging

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


def configure_threads(intra_op: int, inter_op: int) -> None:
    """Sizes TensorFlow's thread pools; 0 keeps its default (every core).

    Must run before TensorFlow executes its first op. At batch 1 RANet's convolutions
    are too small to split: one intra-op thread cut its latency by a quarter on a 2-core
    CPU, while ResNet50's got 46% slower (BUILD_NOTES.md, Performance).
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


class WorkerDirectory:
    """The model directory for the chief; a throw-away directory for other workers.

    Every worker must take part in saving a checkpoint (mirrored variables are
    read collectively), but only the chief's copy is kept. A worker's folder is
    named after its task and the model directory, so that a relaunch after a
    SIGKILL (which leaves no chance to clean up) removes what the killed one left.
    """

    def __init__(self, model_dir: str, chief: bool, task: str = "worker"):
        self.chief = chief
        if chief:
            self.path = model_dir
            return
        digest = hashlib.sha1(os.path.abspath(model_dir).encode()).hexdigest()[:12]
        self.path = os.path.join(tempfile.gettempdir(), f"ranet_{task}_{digest}")
        shutil.rmtree(self.path, ignore_errors=True)
        os.makedirs(self.path)

    def cleanup(self) -> None:
        if not self.chief:
            shutil.rmtree(self.path, ignore_errors=True)


def task_name(strategy: tf.distribute.Strategy) -> str:
    """``<type>_<index>`` of this process in its cluster; ``worker_0`` outside one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "worker_0"
    return f"{resolver.task_type}_{resolver.task_id}"


class PreemptionWatcher:
    """Turns SIGTERM (a preemption notice) into a flag the compiled train loop reads every step.

    A Python signal handler runs only when the main thread is back in Python, i.e. after
    the current ``train_loop`` call. So the handler's C half also writes the signal number
    to a wake-up pipe, and a thread reading the pipe sets ``flag`` (a local
    ``tf.Variable``, created outside any strategy scope) while the loop is still running:
    the loop then ends at the next step boundary. Use as a context manager around
    training; on exit the previous handler and wake-up fd are put back. Outside the main
    thread signals cannot be caught: it then only logs a warning.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        if tf.distribute.has_strategy():
            raise RuntimeError("create the PreemptionWatcher outside strategy.scope(): its flag "
                               "must be one local variable per worker, not a mirrored one")
        with tf.device("/cpu:0"):  # read by the host part of the loop, set by a host thread
            self.flag = tf.Variable(0, dtype=tf.int32, trainable=False, name="stop_request")
        self.received = threading.Event()
        self._lock = threading.RLock()  # the handler may interrupt itself in the main thread
        self._previous_handlers, self._previous_wakeup_fd = {}, None
        self._pipe, self._thread = None, None

    def _handle(self, signum, frame):
        del frame
        self._request(signum)

    def _request(self, signum: int):
        with self._lock:
            if self.received.is_set():
                return
            self.flag.assign(1)
            self.received.set()
        logging.warning("received %s: stopping at the next step boundary with a checkpoint",
                        signal.Signals(signum).name)

    def _watch(self, read_fd: int):
        while True:
            data = os.read(read_fd, 1)
            if not data or data[0] == 0:  # closed, or the stop sentinel
                return
            if data[0] in self.signals:
                self._request(data[0])
            if self._previous_wakeup_fd not in (None, -1):  # e.g. an asyncio loop's
                with contextlib.suppress(OSError):
                    os.write(self._previous_wakeup_fd, data)

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            logging.warning("training outside the main thread: %s will not be caught",
                            ", ".join(signal.Signals(s).name for s in self.signals))
            return self
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._thread = threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                                        name="PreemptionWatcher")
        self._thread.start()
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self._handle)
        self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc_info):
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        read_fd, write_fd = self._pipe
        os.write(write_fd, b"\0")
        self._thread.join(timeout=5)
        os.close(write_fd)
        os.close(read_fd)
        self._pipe = None


def describe(strategy: tf.distribute.Strategy, config: RuntimeConfig) -> str:
    return json.dumps({"strategy": type(strategy).__name__,
                       "replicas": strategy.num_replicas_in_sync,
                       "precision": config.precision, "xla": config.xla,
                       "tensorflow": tf.__version__})
