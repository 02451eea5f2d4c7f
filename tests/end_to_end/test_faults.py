"""Faults that need real processes: preemption, kills, a lost worker, a bad model_dir.

Signals and exit statuses need real processes: these tests run the train binary on the smoke
preset (`flags/ranet_smoke.cfg`) in subprocesses, each bounded by a timeout. Faults that do not
(a non-finite loss, unreadable checkpoints) are tested in-process in tests/training.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from helpers import REPO_ROOT
from launch.local import free_ports
from ranet.training.model_dir import restore_model
from ranet.training.preemption import PREEMPTED_EXIT_CODE, WORKER_LOST_EXIT_CODE

pytestmark = pytest.mark.end_to_end

# 60 steps; compiled calls end at evaluations (every 24 steps), logs and checkpoints (every
# 20): steps 25-40 run in one call.
STEPS = ["--train_steps=60", "--checkpoint_every_steps=20", "--log_every_steps=20",
         "--deterministic"]
RUN_TIMEOUT = 180
# The batch of this step waits in the input pipeline until the test lets it through, so a
# trainer that has logged step 24 is held inside the call of steps 25-40 however slow the test
# is to react: it cannot reach step 40 before the signal has been read.
GATED_STEP = 38
# The train binary, with its input pipeline gated at GATED_STEP: the pipeline writes
# argv[1] when it reaches that batch and waits for argv[2] to exist. Only the test's process
# changes; the batches, and so the weights, are those of an ungated run.
_GATED_TRAINER = """
import os, sys, time
import tensorflow as tf
from ranet import cli, data, train
reached, release = sys.argv[1:3]
del sys.argv[1:3]

def wait_at(index):
    if int(index) == {gated_index}:
        open(reached, "w").close()
        deadline = time.time() + {timeout}
        while not os.path.exists(release) and time.time() < deadline:
            time.sleep(0.05)
    return True

def gated(input_fn):
    def gated_input_fn(context):
        def gate(index, batch):
            passed = tf.py_function(wait_at, [index], tf.bool)
            with tf.control_dependencies([passed]):
                return tf.nest.map_structure(tf.identity, batch)
        return input_fn(context).enumerate().map(gate)
    return gated_input_fn

train_input_fn = data.train_input_fn
data.train_input_fn = lambda *args, **kwargs: gated(train_input_fn(*args, **kwargs))
cli.run(train.main, train.define_flags)
""".format(gated_index=GATED_STEP - 1, timeout=RUN_TIMEOUT)


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

    def __init__(self, model_dir, *args, log, env=None, command=None):
        self.log = log
        with open(log, "w") as out:
            self.popen = subprocess.Popen(command or _command(model_dir, *args), cwd=REPO_ROOT,
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


class _GatedProcess(_Process):
    """A training subprocess held inside the call of steps 25-40 until ``release``."""

    def __init__(self, model_dir, *args, log):
        self.reached = model_dir.parent / f"{model_dir.name}.reached"
        self.released = model_dir.parent / f"{model_dir.name}.released"
        command = [sys.executable, "-c", _GATED_TRAINER, str(self.reached), str(self.released),
                   *_command(model_dir, *args)[3:]]
        super().__init__(model_dir, *args, log=log, command=command)

    def wait_inside_the_call(self) -> None:
        """Returns once step 24 is done and the batch of GATED_STEP waits to be let through."""
        self.wait_for("validation at step 24")
        deadline = time.time() + RUN_TIMEOUT
        while not self.reached.exists():
            if self.popen.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the batch of step {GATED_STEP} was never reached:\n"
                                     f"{self.text()[-3000:]}")
            time.sleep(0.05)

    def release(self) -> None:
        self.released.touch()


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
    process = _GatedProcess(tmp_path, *STEPS, log=tmp_path.parent / "sigterm.log")
    try:
        process.wait_inside_the_call()
        process.popen.send_signal(signal.SIGTERM)
        process.wait_for("received SIGTERM")  # the loop's flag is set: let the steps go on
        process.release()
        assert process.wait(60) == PREEMPTED_EXIT_CODE, process.text()[-3000:]
    finally:
        process.release()
        process.kill()
    log = process.text()
    assert "received SIGTERM" in log and "Traceback" not in log
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    stopped_at = int(latest.rsplit("-", 1)[1])
    assert f"saved {latest} at step {stopped_at}" in log
    # Sent inside the call of steps 25-40, before step GATED_STEP: the stop did not wait for
    # the call's end.
    assert 24 < stopped_at <= GATED_STEP + 1 < 40

    run = _run(tmp_path, *STEPS)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resumed from {latest}" in run.stderr
    assert f"starting at {stopped_at}" in run.stderr
    _assert_same_weights(tmp_path, uninterrupted)


def test_sigkill_between_checkpoints_resumes_from_the_last_one(tmp_path, uninterrupted):
    process = _GatedProcess(tmp_path, *STEPS, log=tmp_path.parent / "sigkill.log")
    try:
        # Killed in the middle of steps 25-40, between the checkpoints of steps 20 and 40.
        process.wait_inside_the_call()
        process.popen.kill()
        process.wait(30)
    finally:
        process.release()
        process.kill()
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert latest is not None and latest.endswith("ckpt-20")

    run = _run(tmp_path, *STEPS)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resumed from {latest}" in run.stderr
    _assert_same_weights(tmp_path, uninterrupted)


def _start_workers(model_dir, logs_dir, name, *args):
    ports = free_ports(2)
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
        assert workers[0].wait(90) == WORKER_LOST_EXIT_CODE, workers[0].text()[-3000:]
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


def _in_own_mount_namespace(script: str, timeout=120):
    """Runs a shell script in a private mount namespace (real mounts, gone afterwards)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.decode()[:200]}")
    return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


# Each case: tmpfs mount options, whether to fill it first, and the reason the binary gives.
_FULL_OR_READ_ONLY = {
    "read_only": ("-o ro,size=1m", False, "it is on a read-only file system"),
    "full": ("-o size=8k", True, "its disk is full"),                 # ENOSPC on the first write
    "nearly_full": ("-o size=8k", False, "its checkpoints need about"),  # a file fits, not a checkpoint
}
# One process tries every case in turn (what the binary does with each error is tested in
# tests/test_binaries.py): the train binary's main, on each mounted model_dir.
_TRY_EACH = """
import sys
from ranet import cli, train
for model_dir in sys.argv[1:]:
    try:
        cli.call(train.main, train.define_flags, ["--flagfile=flags/ranet_smoke.cfg",
                                                  f"--model_dir={model_dir}"])
        print("TRAINED:", model_dir)
    except ValueError as error:
        print("REFUSED:", model_dir, error)
"""


def test_read_only_or_full_model_dir_fails_before_training(tmp_path):
    script, model_dirs = [], []
    for name, (options, fill, _) in _FULL_OR_READ_ONLY.items():
        mount_point = tmp_path / name
        mount_point.mkdir()
        script.append(f"mount -t tmpfs {options} tmpfs {mount_point} || exit 97;")
        if fill:
            script.append(f"dd if=/dev/zero of={mount_point}/fill bs=1k count=64 2>/dev/null;")
        model_dirs.append(str(mount_point / "run"))
    script.append(f"{sys.executable} -c '{_TRY_EACH}' {' '.join(model_dirs)} || exit 1;")
    script.append("for d in " + " ".join(model_dirs) + "; do echo LEFT: $d $(ls -A $d 2>/dev/null); done")
    run = _in_own_mount_namespace(" ".join(script))
    if run.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr[-200:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    for (name, (_, _, message)), model_dir in zip(_FULL_OR_READ_ONLY.items(), model_dirs):
        refused = [line for line in lines if line.startswith(f"REFUSED: {model_dir} ")]
        assert refused and message in refused[0], (name, run.stdout)
        assert f"LEFT: {model_dir}" in lines, (name, run.stdout)  # nothing written into it
