"""Devices, strategies, worker agreement and SIGTERM: where the runtime flags take effect."""

import dataclasses
import logging
import os
import signal

import pytest
import tensorflow as tf

from helpers import SMOKE
from ranet import config as config_lib
from ranet import devices
from ranet.errors import UsageError
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


@pytest.fixture(scope="module")
def mirrored():
    return distribute.create_strategy(config_lib.RuntimeConfig(strategy="mirrored",
                                                               num_cpu_devices=2))


def _per_replica(strategy, *values):
    """Replica i's value is ``values[i]``: what n workers of one replica each contribute."""
    return strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(values[context.replica_id_in_sync_group], tf.int64))


def test_workers_that_agree_pass_the_check_and_say_what_they_agreed_on(mirrored, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    distribute.check_workers_agree(mirrored, SMOKE, step=7)  # replicas of one process agree
    fingerprint = distribute.config_fingerprint(SMOKE)
    assert (f"the 2 replicas agree on the configuration (fingerprint {fingerprint:05x}) and "
            "the step (7)") in caplog.text


def test_the_fingerprint_covers_every_flag_but_the_data_folder():
    fingerprint = distribute.config_fingerprint(SMOKE)
    assert 0 <= fingerprint < 2**20
    elsewhere = dataclasses.replace(SMOKE, data=dataclasses.replace(SMOKE.data,
                                                                    data_dir="/elsewhere"))
    assert distribute.config_fingerprint(elsewhere) == fingerprint
    faster = dataclasses.replace(SMOKE, optim=dataclasses.replace(
        SMOKE.optim, learning_rate=SMOKE.optim.learning_rate * 2))
    assert distribute.config_fingerprint(faster) != fingerprint


def test_workers_that_disagree_are_told_what_differs(mirrored):
    flags, other_flags = (distribute.config_fingerprint(SMOKE),
                          distribute.config_fingerprint(dataclasses.replace(
                              SMOKE, optim=dataclasses.replace(SMOKE.optim, batch_size=64))))
    distribute._check_agreement(mirrored, _per_replica(mirrored, [7, flags], [7, flags]), 7)
    with pytest.raises(UsageError, match="started with different flags.*only TF_CONFIG and "
                                         "--data_dir may differ"):
        distribute._check_agreement(
            mirrored, _per_replica(mirrored, [7, flags], [7, other_flags]), 7)
    with pytest.raises(UsageError, match=r"resumed from different steps \(this one from 7; "
                                         r"the mean is 8\).*same shared folder"):
        distribute._check_agreement(mirrored, _per_replica(mirrored, [7, flags], [9, flags]), 7)
    # Other flags explain a different step too (another --model_dir): they are named first.
    with pytest.raises(UsageError, match="different flags"):
        distribute._check_agreement(
            mirrored, _per_replica(mirrored, [7, flags], [0, other_flags]), 7)


def test_every_worker_gets_the_chief_s_value(mirrored):
    assert distribute.broadcast_from_chief(mirrored, 2**40 + 3) == 2**40 + 3
    assert int(distribute._from_replica_zero(mirrored, _per_replica(mirrored, 5, 9))) == 5
    assert int(distribute._from_replica_zero(mirrored, _per_replica(mirrored, -4, 0))) == -4


def test_a_peer_error_is_summarized_by_its_last_paragraph():
    message = ("Collective ops is aborted by: failed to connect to all addresses\n"
               "Additional GRPC error information:\n  grpc_status:14\n\n"
               "  Task /job:worker/replica:0/task:1 heartbeat timeout.\n"
               "\t [[{{node CollectiveReduceV2}}]]\n"
               "  The error could be from a previous operation. Restart your program.\n")
    error = tf.errors.UnavailableError(None, None, message)
    assert distribute.peer_error_summary(error) == (
        "Task /job:worker/replica:0/task:1 heartbeat timeout. The error could be from a "
        "previous operation. Restart your program.")
    long = tf.errors.DeadlineExceededError(None, None, "timed out " * 100)
    summary = distribute.peer_error_summary(long)
    assert len(summary) == 403 and summary.startswith("timed out") and summary.endswith("...")


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


def test_the_watcher_flag_is_local_to_the_worker(mirrored):
    with mirrored.scope(), pytest.raises(RuntimeError, match="outside strategy.scope"):
        PreemptionWatcher()
