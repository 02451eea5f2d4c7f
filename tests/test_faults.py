"""Faults during training: preemption, kills, a lost worker, a non-finite loss, a bad model_dir.

Signals and exit statuses need real processes: those tests run the train binary on the smoke
preset (`flags/ranet_smoke.cfg`) in subprocesses, each bounded by a timeout. The rest call
`trainer.train_and_evaluate` in-process.
"""

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, event_scalars
from ranet import checkpoints, trainer
from ranet.checkpoints import restore_model
from test_train import _experiment

# 60 steps; train_loop calls end at evaluations (every 24 steps), logs and checkpoints (every
# 20): steps 25-40 run in one call.
STEPS = ["--train_steps=60", "--checkpoint_every_steps=20", "--log_every_steps=20",
         "--deterministic"]
RUN_TIMEOUT = 180


def _command(model_dir, *args):
    return [sys.executable, "-m", "ranet.train", "--flagfile=flags/ranet_smoke.cfg",
            f"--model_dir={model_dir}", *args]


def _env(**extra):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def _run(model_dir, *args, timeout=RUN_TIMEOUT):
    return subprocess.run(_command(model_dir, *args), cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


class _Process:
    """A training subprocess whose log goes to a file, so that it can be waited on."""

    def __init__(self, model_dir, *args, log, env=None):
        self.log = log
        with open(log, "w") as out:
            self.popen = subprocess.Popen(_command(model_dir, *args), cwd=REPO_ROOT,
                                          env=env or _env(), stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        with open(self.log) as f:
            return f.read()

    def wait_for(self, needle: str, timeout: float = RUN_TIMEOUT) -> None:
        deadline = time.time() + timeout
        while needle not in self.text():
            if self.popen.poll() is not None:
                raise AssertionError(f"exited ({self.popen.returncode}) before {needle!r}:\n"
                                     f"{self.text()[-3000:]}")
            if time.time() > deadline:
                raise AssertionError(f"no {needle!r} after {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"still running after {timeout} s:\n{self.text()[-3000:]}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def _weights(model_dir):
    _, model, path = restore_model(str(model_dir), "latest")
    return path, [v.numpy() for v in model.variables]


def _assert_same_weights(model_dir, reference_dir):
    path, weights = _weights(model_dir)
    expected_path, expected = _weights(reference_dir)
    assert os.path.basename(path) == os.path.basename(expected_path) == "ckpt-60"
    for value, expected_value in zip(weights, expected):
        np.testing.assert_array_equal(value, expected_value)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The model directory of a deterministic run that nothing interrupted."""
    model_dir = tmp_path_factory.mktemp("uninterrupted")
    run = _run(model_dir, *STEPS)
    assert run.returncode == 0, run.stderr[-3000:]
    return model_dir


def test_sigterm_saves_at_the_step_it_stopped_and_the_relaunch_resumes_there(
        tmp_path, uninterrupted):
    process = _Process(tmp_path, *STEPS, log=tmp_path.parent / "sigterm.log")
    try:
        process.wait_for("validation at step 24")
        process.popen.send_signal(signal.SIGTERM)
        assert process.wait(60) == trainer.PREEMPTED_EXIT_CODE, process.text()[-3000:]
    finally:
        process.kill()
    log = process.text()
    assert "received SIGTERM" in log and "Traceback" not in log
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    stopped_at = int(latest.rsplit("-", 1)[1])
    assert f"saved {latest} at step {stopped_at}" in log
    # Sent as steps 25-40 started, in one train_loop call: the stop did not wait for its end.
    assert 24 < stopped_at < 40

    run = _run(tmp_path, *STEPS)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resumed from {latest}" in run.stderr
    assert f"starting at {stopped_at}" in run.stderr
    _assert_same_weights(tmp_path, uninterrupted)


def test_sigkill_at_a_random_step_resumes_from_the_last_checkpoint(tmp_path, uninterrupted):
    process = _Process(tmp_path, *STEPS, log=tmp_path.parent / "sigkill.log")
    try:
        process.wait_for("validation at step 24")
        time.sleep(random.uniform(0, 1.5))
        process.popen.kill()
        process.wait(30)
    finally:
        process.kill()
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert latest is not None

    run = _run(tmp_path, *STEPS)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resumed from {latest}" in run.stderr
    _assert_same_weights(tmp_path, uninterrupted)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(model_dir, logs_dir, name, *args):
    ports = _free_ports(2)
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                     "task": {"type": "worker", "index": index}}
        workers.append(_Process(model_dir, "--strategy=multi_worker_mirrored", *args,
                                log=logs_dir / f"{name}{index}.log",
                                env=_env(TF_CONFIG=json.dumps(tf_config))))
    return workers


def test_a_killed_worker_stops_the_others_and_the_relaunch_resumes(tmp_path):
    args = ["--train_steps=30", "--checkpoint_every_steps=10"]
    workers = _start_workers(tmp_path, tmp_path.parent, "killed", *args)
    try:
        workers[0].wait_for("step 15/30", timeout=240)
        workers[1].popen.kill()
        killed = time.time()
        assert workers[0].wait(90) == trainer.WORKER_LOST_EXIT_CODE, workers[0].text()[-3000:]
        assert time.time() - killed < 90
    finally:
        for worker in workers:
            worker.kill()
    assert "lost contact with another worker after step" in workers[0].text()
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert latest is not None and int(latest.rsplit("-", 1)[1]) >= 10

    workers = _start_workers(tmp_path, tmp_path.parent, "relaunched", *args)
    try:
        for worker in workers:
            assert worker.wait(240) == 0, worker.text()[-3000:]
    finally:
        for worker in workers:
            worker.kill()
    for worker in workers:  # every worker restores the chief's checkpoint
        assert f"resumed from {latest}" in worker.text()
        assert "done at step 30" in worker.text()


def test_non_finite_loss_names_the_exact_step_and_saves_nothing_after_it(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    trainer.train_and_evaluate(_experiment(first, steps=10, deterministic=True))
    shutil.copytree(first, second)
    # A learning rate of 1e4 diverges within a few steps of the resumed run. In `first` one
    # call runs steps 11-20, in `second` every step is its own call: both must name the
    # same step.
    failing_step = {}
    for model_dir, log_every in ((first, 100), (second, 1)):
        with pytest.raises(FloatingPointError, match=r"non-finite training loss at step (\d+)") \
                as error:
            trainer.train_and_evaluate(_experiment(model_dir, steps=40, lr=1e4,
                                                   deterministic=True, log_every_steps=log_every))
        failing_step[log_every] = int(error.value.args[0].split("step ")[1].split(";")[0])
        assert "ckpt-10" in str(error.value)
        assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-10")
    step = failing_step[100]
    assert 10 < step < 20 and failing_step[1] == step
    losses = event_scalars(second)["loss/total"]
    assert all(np.isfinite(losses[s]) for s in range(11, step)), losses
    assert max(losses) == step - 1  # the failing step is neither logged nor saved


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    trainer.train_and_evaluate(_experiment(tmp_path, steps=20))
    checkpoints = tmp_path / "checkpoints"
    # A machine crash can leave the newest checkpoint named but truncated.
    data = checkpoints / "ckpt-20.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    (checkpoints / "ckpt-30_temp").mkdir()  # litter of a save a SIGKILL interrupted
    caplog.set_level(logging.INFO, logger="absl")
    result = trainer.train_and_evaluate(_experiment(tmp_path, steps=30))
    assert result["step"] == 30
    assert "ckpt-20 cannot be restored" in caplog.text
    assert f"resumed from {checkpoints / 'ckpt-10'}" in caplog.text
    assert not (checkpoints / "ckpt-30_temp").exists()
    assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-30")


def test_eval_and_export_restore_the_newest_readable_checkpoint(tmp_path, caplog):
    trainer.train_and_evaluate(_experiment(tmp_path, steps=20))
    data = tmp_path / "checkpoints" / "ckpt-20.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    caplog.set_level(logging.INFO, logger="absl")
    _, _, path = restore_model(str(tmp_path), "latest")
    assert path == str(tmp_path / "checkpoints" / "ckpt-10")
    assert "ckpt-20 cannot be restored" in caplog.text


def test_restoring_a_model_dir_without_checkpoints_says_to_train_it_first(tmp_path):
    trainer.train_and_evaluate(_experiment(tmp_path, steps=10))
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(FileNotFoundError, match="train it first"):
        restore_model(str(tmp_path))


def _assert_clean_failure(run, message):
    assert run.returncode == 2, run.stderr[-3000:]
    assert message in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_model_dir_under_a_file_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    run = _run(tmp_path / "file" / "run", timeout=120)
    _assert_clean_failure(run, "is not writable (part of the path is a file")


def _in_own_mount_namespace(script: str, timeout=120):
    """Runs a shell script in a private mount namespace (real mounts, gone afterwards)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.decode()[:200]}")
    return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("mount, fill, message", [
    ("-o ro,size=1m", False, "it is on a read-only file system"),
    ("-o size=8k", True, "its disk is full"),                  # ENOSPC on the first write
    ("-o size=8k", False, "its checkpoints need about"),       # room for a file, not a checkpoint
], ids=["read_only", "full", "nearly_full"])
def test_read_only_or_full_model_dir_fails_before_training(tmp_path, mount, fill, message):
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    train = " ".join(_command(mount_point / "run"))
    fill_it = f"dd if=/dev/zero of={mount_point}/fill bs=1k count=64 2>/dev/null;" if fill else ""
    run = _in_own_mount_namespace(
        f"mount -t tmpfs {mount} tmpfs {mount_point} || exit 97; {fill_it} {train}; status=$?; "
        f"echo LEFT: $(ls -A {mount_point}/run 2>/dev/null); exit $status")
    if run.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr[-200:]}")
    _assert_clean_failure(run, message)
    assert run.stdout.strip() == "LEFT:", run.stdout  # nothing written into the model_dir


def test_an_unreadable_checkpoint_state_file_falls_back_to_the_files(tmp_path):
    for number in (5, 12, 7):
        (tmp_path / f"ckpt-{number}.index").write_bytes(b"")
    (tmp_path / "ckpt-best.index").write_bytes(b"")
    (tmp_path / "checkpoint").write_text("model_checkpoint_path: {{{ not a text proto")
    assert checkpoints.candidates(str(tmp_path)) == [
        str(tmp_path / f"ckpt-{number}") for number in (12, 7, 5)]
