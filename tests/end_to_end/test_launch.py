"""Launchers: launch.local, and 1 replica vs 2 replicas or 2 workers training alike.

With --sync_batch_norm --deterministic, fp32, one global batch and one data order, two
workers under MultiWorkerMirroredStrategy (through ``python -m launch.local``) and
MirroredStrategy over 2 logical CPUs must train like one_device: the same loss at every
step and the same final weights, up to float rounding. The workers are real processes of the
real binary, so flags, TF_CONFIG and the chief's directory are exercised as users meet them.
one_device and mirrored run in-process (the test process has 2 logical CPUs). This is the only
test that trains under MirroredStrategy in-process: a second MirroredStrategy in one process
reuses the first one's collective instance keys, and TensorFlow then refuses the all-reduces
("Shape mismatch in the collective instance"). A user's process trains once.
"""

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from helpers import REPO_ROOT, SYNTHETIC_DATA, TINY_RANET, event_scalars, python, tail
from ranet import cli, costs, train
from ranet.models import get_model
from ranet.training.model_dir import restore_model

pytestmark = pytest.mark.end_to_end

# The smoke preset, logging every step, at a hundredth of its learning rate. Why the lower rate:
# this tiny net (batch norms over few channels) amplifies float rounding about 2-5x per step:
# one_device with --sync_batch_norm against one_device without it (the same math on one
# replica, other kernels) differs by 1.4e-7 in the loss at step 1 but 2.3e-4 at step 10 at lr
# 0.005, where 2 replicas differ from 1 by up to 5.5e-4 and a real difference (per-replica
# batch norm) by 4.5e-4 to 5.7e-3: no tolerance separates them. At 0.002 the 10 steps stay
# well behaved.
TRAIN_FLAGS = ["--flagfile=flags/ranet_smoke.cfg", "--train_steps=10", "--sync_batch_norm",
               "--deterministic", "--log_every_steps=1", "--learning_rate=0.002"]
STEPS = list(range(1, 11))
# Tolerances, from measurements on a 2-core x86 CPU (TF 2.21, oneDNN on). The only
# difference between 1 and 2 replicas is the order of float sums: batch norm statistics and
# gradients are summed per replica, then across replicas (2 workers and 2 mirrored replicas
# gave bit-identical results; each differs from one_device as follows).
# - Step 1 (identical weights and batch, forward pass only): measured equal.
STEP_1_RTOL = 1e-5
# - Loss at every step: measured at most 8.2e-5 relative. Bound 3e-4. A real difference is
#   larger: per-replica batch norm (no --sync_batch_norm) is 2.4e-3 off at step 1.
LOSS_RTOL = 3e-4
# - Final weights: trainable ones measured at most 6.0e-4 apart (absolute), moving
#   statistics at most 3.7e-3 (1.1e-3 relative for variances). Bound |a - b| <= 2e-3 +
#   2e-3 |b|. Per-replica batch norm moves trainable weights by 6.7e-3, moving statistics by
#   8e-2.
WEIGHT_RTOL = WEIGHT_ATOL = 2e-3


def _train_in_process(*flags):
    return cli.call(train.main, train.define_flags, [*TRAIN_FLAGS, *flags])


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """The reference: one replica, the same flags."""
    model_dir = tmp_path_factory.mktemp("one_device")
    _train_in_process("--strategy=one_device", f"--model_dir={model_dir}")
    return model_dir


def _assert_trains_like(model_dir, reference):
    losses = event_scalars(model_dir)["loss/total"]
    expected = event_scalars(reference)["loss/total"]
    assert sorted(losses) == sorted(expected) == STEPS
    assert losses[1] == pytest.approx(expected[1], rel=STEP_1_RTOL)
    np.testing.assert_allclose([losses[s] for s in STEPS], [expected[s] for s in STEPS],
                               rtol=LOSS_RTOL)
    _, model, path = restore_model(str(model_dir), "latest")
    _, reference_model, reference_path = restore_model(str(reference), "latest")
    assert os.path.basename(path) == os.path.basename(reference_path) == "ckpt-10"
    assert len(model.variables) == len(reference_model.variables)
    for variable, expected_variable in zip(model.variables, reference_model.variables):
        assert variable.path == expected_variable.path
        np.testing.assert_allclose(variable.numpy(), expected_variable.numpy(),
                                   rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, err_msg=variable.path)


def test_sync_batch_norm_reaches_every_batch_norm_layer_and_costs_nothing():
    synced = dataclasses.replace(TINY_RANET, sync_batch_norm=True)
    batch_norms = [layer for stage in get_model(synced).stages for layer in stage.layers
                   if isinstance(layer, keras.layers.BatchNormalization)]
    assert batch_norms and all(layer.synchronized for layer in batch_norms)
    assert not any(layer.synchronized for stage in get_model(TINY_RANET).stages
                   for layer in stage.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert costs.count(get_model(synced)) == costs.count(get_model(TINY_RANET))


def test_two_workers_through_the_launcher_train_like_one_device(tmp_path, one_device_run):
    model_dir, scratch = tmp_path / "two_workers", tmp_path / "tmp"
    scratch.mkdir()
    # TMPDIR: where the non-chief worker keeps (and must remove) its throw-away checkpoints.
    process = python("-m", "launch.local", "--workers=2", "--", *TRAIN_FLAGS,
                     f"--model_dir={model_dir}", timeout=300, env={"TMPDIR": str(scratch)})
    assert process.returncode == 0, tail(process)
    lines = process.stdout.splitlines()
    assert all(line.startswith(("[worker 0] ", "[worker 1] ")) for line in lines), lines[:5]
    for index in (0, 1):
        # Each worker ran the multi-worker strategy with both replicas in sync.
        assert any(line.startswith(f"[worker {index}] ") and
                   '"strategy": "CollectiveAllReduceStrategy", "replicas": 2' in line
                   for line in lines), f"worker {index}"
    assert "[launch] all 2 workers finished" in process.stderr
    # Only the chief wrote into model_dir; the other worker's directory is gone.
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-10")
    assert not list(scratch.glob("ranet_*"))
    _assert_trains_like(model_dir, one_device_run)


def test_mirrored_on_two_cpus_trains_like_one_device(tmp_path, one_device_run, caplog):
    model_dir = tmp_path / "mirrored"
    caplog.set_level("INFO", logger="absl")
    result = _train_in_process("--strategy=mirrored", "--num_cpu_devices=2",
                               f"--model_dir={model_dir}")
    assert '"strategy": "MirroredStrategy", "replicas": 2' in caplog.text
    # Evaluation over 2 replicas counts every validation image once.
    assert result["validation"]["examples"] == SYNTHETIC_DATA.validation_size
    _assert_trains_like(model_dir, one_device_run)


def test_launcher_stops_every_worker_when_the_chief_fails(tmp_path):
    # Only the chief checks --model_dir: it fails (status 2) while worker 1 is left waiting
    # for it in a collective, which only the launcher can end.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    process = python(
        "-m", "launch.local", "--workers=2", "--grace_period_seconds=5", "--",
        "--flagfile=flags/ranet_smoke.cfg", f"--model_dir={blocker / 'run'}", timeout=180,
        env={"TMPDIR": str(tmp_path)})  # where a killed worker leaves its directory
    assert process.returncode == 2, tail(process)
    assert "[worker 0] error: --model_dir=" in process.stdout
    assert "[launch] worker 0 exited with status 2" in process.stderr
    assert "sending SIGTERM to worker(s) 1" in process.stderr


def test_dry_run_prints_each_workers_environment_and_command():
    process = python("-m", "launch.local", "--workers=3", "--dry_run", "--",
                     "--flagfile=flags/ranet_smoke.cfg", "--model_dir=runs/x", timeout=60)
    assert process.returncode == 0, tail(process)
    lines = process.stdout.splitlines()
    assert len(lines) == 3
    configs = []
    for index, line in enumerate(lines):
        assert line.startswith(f"[worker {index}] ")
        words = shlex.split(line[len(f"[worker {index}] "):])
        env = dict(word.split("=", 1) for word in words[:2])
        command = words[2:]
        assert command[1:] == ["-m", "ranet.train", "--flagfile=flags/ranet_smoke.cfg",
                               "--model_dir=runs/x", "--strategy=multi_worker_mirrored"]
        assert env["PYTHONUNBUFFERED"] == "1"
        configs.append(json.loads(env["TF_CONFIG"]))
    addresses = configs[0]["cluster"]["worker"]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"] == {"worker": addresses} for c in configs)
    assert len(set(addresses)) == 3 and all(a.startswith("localhost:") for a in addresses)


def test_dry_run_keeps_a_named_strategy_and_fixed_ports():
    process = python("-m", "launch.local", "--workers=2", "--port_base=23456", "--dry_run",
                     "--", "--strategy", "multi_worker_mirrored", "--model_dir=runs/x",
                     timeout=60)
    assert process.returncode == 0, tail(process)
    first = shlex.split(process.stdout.splitlines()[0][len("[worker 0] "):])
    assert json.loads(first[0].split("=", 1)[1])["cluster"]["worker"] == [
        "localhost:23456", "localhost:23457"]
    assert first[-3:] == ["--strategy", "multi_worker_mirrored", "--model_dir=runs/x"]


def test_launcher_needs_training_flags():
    process = python("-m", "launch.local", "--workers=2", timeout=60)
    assert process.returncode == 2
    assert "give them after --" in process.stderr


def _assert_valid_train_flags(train_flags):
    """The flags parse as ranet.train's and make a valid configuration."""
    values = flags.FlagValues()
    train.define_flags(values)
    values(["ranet.train", *train_flags])
    cli.experiment_config(values)


def test_kubernetes_tfjob_runs_the_same_command_on_every_worker():
    import yaml

    documents = list(yaml.safe_load_all((REPO_ROOT / "launch/k8s/tfjob.yaml").read_text()))
    claim = next(d for d in documents if d["kind"] == "PersistentVolumeClaim")
    job = next(d for d in documents if d["kind"] == "TFJob")
    assert job["apiVersion"] == "kubeflow.org/v1" and list(job["spec"]["tfReplicaSpecs"]) == ["Worker"]
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] >= 2 and worker["restartPolicy"] == "OnFailure"
    pod = worker["template"]["spec"]
    [container] = pod["containers"]
    assert container["name"] == "tensorflow"  # the operator's TF_CONFIG port is on it
    assert container["command"] == ["python", "-m", "ranet.train"]
    assert "--strategy=multi_worker_mirrored" in container["args"]
    assert "nvidia.com/gpu" in container["resources"]["limits"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    for flag in ("--model_dir=", "--data_dir="):
        [path] = [a[len(flag):] for a in container["args"] if a.startswith(flag)]
        assert any(path.startswith(mount) and name == claim["metadata"]["name"]
                   for mount, name in mounts.items()), flag
    _assert_valid_train_flags(container["args"])


def test_slurm_script_runs_one_worker_per_node():
    path = REPO_ROOT / "launch/slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    script = path.read_text()
    assert "#SBATCH --ntasks-per-node=1" in script and "unset TF_CONFIG" in script
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1" in script
    assert 'python -m ranet.train --strategy=multi_worker_mirrored "$@"' in script
    # The submission example in the header passes valid training flags.
    lines = script.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("#   sbatch "))
    example = []
    for line in lines[first:]:
        example.append(line.lstrip("#").rstrip("\\"))
        if not line.endswith("\\"):
            break
    words = shlex.split(" ".join(example))
    _assert_valid_train_flags(["--strategy=multi_worker_mirrored",
                               *words[words.index("launch/slurm.sbatch") + 1:]])


# Stand-in workers for the signal tests: no TensorFlow, so each test takes a second or two.
# Each announces it is ready (its SIGTERM handler installed) by creating a file; a failing
# worker fails only once every worker is ready, so the launcher's SIGTERM finds handlers.
_FAKE_WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    behaviour, ready_dir, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def on_sigterm(signum, frame):
        if behaviour == "ignore_sigterm":
            print(f"worker {index} ignores SIGTERM", flush=True)
            return
        print(f"worker {index} got SIGTERM", flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_sigterm)
    open(os.path.join(ready_dir, f"ready-{index}"), "w").close()
    print(f"worker {index} ready", flush=True)
    if behaviour == "fail":
        while len(os.listdir(ready_dir)) < workers:
            time.sleep(0.01)
        sys.exit(3)
    for _ in range(600):
        time.sleep(0.1)
""")


def _start_fake_cluster(behaviours, grace_period_seconds, ready_dir, stdout=subprocess.PIPE):
    """A launcher (``launch.local.run_workers``) running one fake worker per behaviour."""
    commands = [[sys.executable, "-c", _FAKE_WORKER, behaviour, str(ready_dir),
                 str(len(behaviours))] for behaviour in behaviours]
    driver = ("import json, sys; from launch.local import run_workers, worker_environments; "
              "commands, grace = json.loads(sys.argv[1]); "
              "sys.exit(run_workers(commands, worker_environments(len(commands)), grace))")
    return subprocess.Popen(
        [sys.executable, "-c", driver, json.dumps([commands, grace_period_seconds])],
        cwd=REPO_ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True)


def _wait_for_text(path, needles, timeout):
    deadline = time.monotonic() + timeout
    while not all(needle in path.read_text() for needle in needles):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {needles}; got {path.read_text()!r}")
        time.sleep(0.05)


def test_launcher_kills_a_worker_that_ignores_sigterm_after_the_grace_period(tmp_path):
    launcher = _start_fake_cluster(["fail", "ignore_sigterm"], grace_period_seconds=1,
                                   ready_dir=tmp_path)
    try:
        stdout, stderr = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
    assert launcher.returncode == 3, stderr
    assert "[worker 0] worker 0 ready" in stdout
    assert "[worker 1] worker 1 ignores SIGTERM" in stdout
    assert "worker 0 exited with status 3" in stderr
    assert "sending SIGKILL to worker(s) 1" in stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_launcher_forwards_a_stop_request_to_every_worker(tmp_path, signum):
    output, ready_dir = tmp_path / "stdout", tmp_path / "ready"
    ready_dir.mkdir()
    with open(output, "w") as stdout:
        launcher = _start_fake_cluster(["wait", "wait"], grace_period_seconds=10,
                                       ready_dir=ready_dir, stdout=stdout)
    try:
        _wait_for_text(output, ["[worker 0] worker 0 ready", "[worker 1] worker 1 ready"],
                       timeout=30)
        launcher.send_signal(signum)
        _, stderr = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
    # Ctrl-C and SIGTERM both reach every worker as SIGTERM (ranet.train: checkpoint, 143).
    stdout = output.read_text()
    assert "[worker 0] worker 0 got SIGTERM" in stdout
    assert "[worker 1] worker 1 got SIGTERM" in stdout
    assert launcher.returncode == 143, stderr
    assert f"received {signal.Signals(signum).name}" in stderr
