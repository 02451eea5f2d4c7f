"""The tf.data service launchers (issue 13): the dispatcher and a worker as real processes."""

import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from helpers import REPO_ROOT
from launch.local import free_ports
from ranet.data import imagenet
from tests.data.test_imagenet import write_shards

pytestmark = pytest.mark.end_to_end


def _start(*args):
    return subprocess.Popen([sys.executable, "-m", "launch.data_service", *args],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_launched_dispatcher_and_worker_serve_imagenet_batches(tmp_path):
    index = imagenet.index_records(imagenet.shard_files(str(write_shards(tmp_path / "d")), "train"))
    dispatcher_port, worker_port = free_ports(2)
    servers = [_start("dispatcher", f"--port={dispatcher_port}")]
    try:
        time.sleep(2)
        servers.append(_start("worker", f"--dispatcher=localhost:{dispatcher_port}",
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


def test_imagenet_trains_under_mirrored_over_two_logical_cpus(tmp_path):
    """The shrunken ImageNet RANet, 3 steps, MirroredStrategy over 2 logical CPU devices."""
    from helpers import python, tail
    from tests.training.test_imagenet_training import SHRUNKEN_IMAGENET_RANET
    data_dir = write_shards(tmp_path / "imagenet")
    process = python("-m", "ranet.train", *SHRUNKEN_IMAGENET_RANET, f"--data_dir={data_dir}",
                     f"--model_dir={tmp_path / 'model'}", "--validation_size=6",
                     "--batch_size=4", "--train_steps=3", "--log_every_steps=1",
                     "--strategy=mirrored", "--num_cpu_devices=2", timeout=600)
    assert process.returncode == 0, tail(process)
    assert "done at step 3" in process.stderr, tail(process)
    assert "'examples': 6" in process.stderr, tail(process)
