"""Devices, strategies, worker agreement and SIGTERM: where the runtime flags take effect."""

import os
import signal

import pytest
import tensorflow as tf

from helpers import SMOKE
from ranet import config as config_lib
from ranet import devices
from ranet.training import distribute
from ranet.training.preemption import PreemptionWatcher


@pytest.mark.parametrize("strategy, kind, replicas", [
    ("default", "_DefaultDistributionStrategy", 1), ("one_device", "OneDeviceStrategy", 1),
    ("mirrored", "MirroredStrategy", 2)])
def test_the_strategy_of_each_flag(strategy, kind, replicas):
    runtime = config_lib.RuntimeConfig(strategy=strategy,
                                       num_cpu_devices=2 if strategy == "mirrored" else 0)
    created = distribute.create_strategy(runtime)
    assert type(created).__name__ == kind and created.num_replicas_in_sync == replicas
    # Outside a cluster every process is the chief, alone.
    assert distribute.is_chief(created) and distribute.num_workers(created) == 1
    assert distribute.task_name(created) == "worker_0"


def test_multi_worker_without_a_cluster_says_where_it_comes_from(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ValueError, match="needs the cluster in TF_CONFIG.*launch/README.md"):
        distribute.create_strategy(config_lib.RuntimeConfig(strategy="multi_worker_mirrored"))


def test_workers_that_agree_pass_the_check():
    mirrored = distribute.create_strategy(config_lib.RuntimeConfig(strategy="mirrored",
                                                                   num_cpu_devices=2))
    distribute.check_workers_agree(mirrored, SMOKE, step=7)  # replicas of one process agree


def test_devices_and_thread_pools_cannot_change_once_tensorflow_runs():
    devices.configure_host_devices(2)  # what the test process already has: accepted
    with pytest.raises(RuntimeError, match="--num_cpu_devices=3 must be applied before"):
        devices.configure_host_devices(3)
    current = tf.config.threading.get_intra_op_parallelism_threads()
    with pytest.raises(RuntimeError, match="must be applied before TensorFlow runs its first op"):
        devices.configure_threads(current + 3, 0)


def test_precision_policy_is_restored_after_a_build():
    with devices.precision_policy("mixed_bfloat16"):
        assert tf.keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert tf.keras.mixed_precision.global_policy().name == "float32"


def test_sigterm_sets_the_flag_the_loop_reads_and_the_old_handler_comes_back():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as watcher:
        assert int(watcher.flag.numpy()) == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.received.wait(timeout=10)
        assert int(watcher.flag.numpy()) == 1
    assert signal.getsignal(signal.SIGTERM) is previous


def test_the_watcher_flag_is_local_to_the_worker():
    mirrored = distribute.create_strategy(config_lib.RuntimeConfig(strategy="mirrored",
                                                                   num_cpu_devices=2))
    with mirrored.scope(), pytest.raises(RuntimeError, match="outside strategy.scope"):
        PreemptionWatcher()
