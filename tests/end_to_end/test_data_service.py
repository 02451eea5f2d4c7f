"""The tf.data service launchers (issue 13): the dispatcher and a worker as real processes."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from helpers import REPO_ROOT, wait_for_output
from launch.local import free_ports
from ranet.data import imagenet
from tests.data.test_imagenet import write_shards

pytestmark = pytest.mark.end_to_end

# A TensorFlow import and a server start, beside other tests on 2 cores: seconds; a server
# that has not said it listens by then will not.
READY_SECONDS = 120


def _start(log, ready_line, *args):
    """A launched server, once it says it listens (the launcher prints one line then)."""
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "launch.data_service", *args],
                                  cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_output(log, ready_line, server, timeout=READY_SECONDS)
    except AssertionError:
        server.kill()
        server.wait()
        raise
    return server


def test_launched_dispatcher_and_worker_serve_imagenet_batches(tmp_path):
    index = imagenet.index_records(imagenet.shard_files(str(write_shards(tmp_path / "d")), "train"))
    dispatcher_port, worker_port = free_ports(2)
    servers = [_start(tmp_path / "dispatcher.log", "tf.data service dispatcher at",
                      "dispatcher", f"--port={dispatcher_port}")]
    try:
        servers.append(_start(tmp_path / "worker.log", "tf.data service worker on port",
                              "worker", f"--dispatcher=localhost:{dispatcher_port}",
                              f"--port={worker_port}", f"--worker_address=localhost:{worker_port}"))
        dataset = imagenet.train_dataset(index, np.ones(len(index), bool), batch_size=2, seed=0,
                                         tf_data_service=f"grpc://localhost:{dispatcher_port}")
        images, labels = next(iter(dataset))
        assert images.shape == (2, 224, 224, 3) and images.dtype == tf.float32
        assert set(labels.numpy()) <= {0, 1, 2}
        assert all(server.poll() is None for server in servers)
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


def test_a_worker_without_a_dispatcher_is_a_usage_error():
    process = subprocess.run([sys.executable, "-m", "launch.data_service", "worker"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2 and "a worker needs --dispatcher=HOST:PORT" in process.stderr


def test_slurm_and_kubernetes_data_service_definitions():
    import yaml
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "launch/data_service.sbatch")]
                          ).returncode == 0
    documents = list(yaml.safe_load_all((REPO_ROOT / "launch/k8s/data_service.yaml").read_text()))
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == ["Deployment", "Deployment", "Service"]
    commands = [" ".join(c.get("command", []) + c.get("args", []))
                for d in documents if d["kind"] == "Deployment"
                for c in d["spec"]["template"]["spec"]["containers"]]
    assert any("launch.data_service dispatcher --port=5050" in c for c in commands)
    assert any("launch.data_service worker --dispatcher=ranet-data-dispatcher:5050" in c
               for c in commands)


def test_two_workers_fed_by_a_tf_data_service_train_like_one_worker(tmp_path):
    """Issue 13's target: 2 MultiWorkerMirrored workers, input from a tf.data service (one
    service worker, in this process), end with the weights of a one-worker run that reads the
    shards itself, over the same global batch (--deterministic, --sync_batch_norm, fp32).

    The one worker runs MirroredStrategy over 2 logical CPUs (a subprocess: this process's
    collectives serve other tests). Against one replica (one_device) the trainable weights
    agree as closely (2.3e-4 measured), but the moving statistics do not: synchronized batch
    norm computes E[x^2] - E[x]^2 over 50k values per channel at 224x224, and summing them in
    another order moves moving variances by up to 8e-2 (BUILD_NOTES.md). The workers' model
    then goes through the eval and export binaries.
    """
    from helpers import python, tail
    from ranet.training.model_dir import restore_model
    from tests.end_to_end.test_launch import WEIGHT_ATOL, WEIGHT_RTOL
    from tests.training.test_imagenet_training import SHRUNKEN_IMAGENET_RANET
    data_dir = write_shards(tmp_path / "imagenet")
    # The rate of test_launch's comparison: this tiny net amplifies float rounding.
    common = [*SHRUNKEN_IMAGENET_RANET, f"--data_dir={data_dir}", "--validation_size=6",
              "--batch_size=4", "--train_steps=3", "--log_every_steps=1",
              "--checkpoint_every_steps=3", "--deterministic", "--sync_batch_norm",
              "--learning_rate=0.002"]
    one = python("-m", "ranet.train", *common, "--strategy=mirrored", "--num_cpu_devices=2",
                 f"--model_dir={tmp_path / 'one'}", timeout=600)
    assert one.returncode == 0, tail(one)
    assert "done at step 3" in one.stderr, tail(one)
    assert "'examples': 6" in one.stderr, tail(one)  # each held-out image once over 2 replicas
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer()
    worker = service.WorkerServer(service.WorkerConfig(
        dispatcher_address=dispatcher.target.split("://")[1]))
    two = python("-m", "launch.local", "--workers=2", "--", *common,
                 f"--tf_data_service={dispatcher.target}", f"--model_dir={tmp_path / 'two'}",
                 timeout=600)
    del worker
    assert two.returncode == 0, tail(two)
    assert '"strategy": "CollectiveAllReduceStrategy", "replicas": 2' in two.stdout
    _, two_model, two_path = restore_model(str(tmp_path / "two"), "latest")
    _, one_model, one_path = restore_model(str(tmp_path / "one"), "latest")
    assert two_path.endswith("ckpt-3") and one_path.endswith("ckpt-3")
    for variable, expected in zip(two_model.variables, one_model.variables):
        assert variable.path == expected.path
        np.testing.assert_allclose(variable.numpy(), expected.numpy(), rtol=WEIGHT_RTOL,
                                   atol=WEIGHT_ATOL, err_msg=variable.path)
    # The model the workers trained evaluates and exports like any other.
    from ranet import cli
    from ranet import eval as eval_binary
    from ranet import export as export_binary
    report = cli.call(eval_binary.main, eval_binary.define_flags, [
        f"--model_dir={tmp_path / 'two'}", f"--report_dir={tmp_path / 'report'}",
        "--split=validation", "--latency_images=2", "--warmup=0", "--batch_size=4",
        "--throughput_images=4"])
    assert report["num_images"] == 3
    assert len(report["models"][0]["runtimes"]["tf"]["exits"]) == 4
    cli.call(export_binary.main, export_binary.define_flags, [
        f"--model_dir={tmp_path / 'two'}", f"--export_dir={tmp_path / 'export'}"])
    served = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"](
        images=tf.zeros([2, 224, 224, 3]))
    assert served["probabilities"].shape == (2, 1000)
