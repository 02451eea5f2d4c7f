"""The eval binary: report schema, calibration kept off the reported images, clean errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
from conftest import REPO_ROOT
from ranet import config as config_lib
from ranet import data, evaluation

SYNTHETIC, RANET = conftest.SYNTHETIC_DATA, conftest.TINY_RANET
VGG16 = config_lib.ModelConfig(name="vgg16", num_classes=10)


def _model_dir(path, model_config):
    conftest.write_model_dir(path, model_config, SYNTHETIC)
    return str(path)


def _eval(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "ranet.eval", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return _model_dir(root / "ranet", RANET), _model_dir(root / "vgg16", VGG16)


def test_report_has_every_section_for_ranet_and_a_baseline(model_dirs, tmp_path):
    ranet_dir, vgg_dir = model_dirs
    run = _eval(f"--model_dir={ranet_dir}", f"--model_dir={vgg_dir}", "--split=test",
                "--budget_mflops=7,9", "--threshold=0.85", f"--report_dir={tmp_path}",
                "--latency_images=8", "--warmup=2", "--throughput_images=32", "--batch_size=16",
                "--intra_op_threads=1", "--inter_op_threads=2")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["split"] == "test" and report["calibration_split"] == "validation"
    assert (report["environment"]["intra_op_threads"],
            report["environment"]["inter_op_threads"]) == (1, 2)
    assert report["num_images"] == SYNTHETIC.synthetic_test_size
    assert report["tensorflow"] == tf.__version__ and report["device"].startswith("CPU")
    ranet, vgg = report["models"]
    assert [m["name"] for m in report["models"]] == ["ranet", "vgg16"]
    assert [e["exit"] for e in ranet["exits"]] == [1, 2, 3]
    assert all(set(e) == {"exit", "macs", "accuracy"} for e in ranet["exits"])
    assert ranet["exits"][0]["macs"] < ranet["exits"][-1]["macs"]
    kinds = [next(k for k in ("q", "budget_mflops", "threshold") if k in b)
             for b in ranet["budgeted"]]
    assert kinds.count("q") == 39 and kinds.count("budget_mflops") == 2
    assert kinds.count("threshold") == 1
    for point in ranet["budgeted"]:
        assert {"thresholds", "expected_macs", "accuracy", "exit_fractions"} <= set(point)
        assert sum(point["exit_fractions"]) == pytest.approx(1.0)
        assert point["thresholds"][-1] == "-inf"
    fixed = next(b for b in ranet["budgeted"] if "threshold" in b)
    assert fixed["thresholds"] == [0.85, 0.85, "-inf"]
    assert set(ranet["latency_ms"]) == {"adaptive", "adaptive@7", "adaptive@9", "full",
                                        "keras_predict"}
    assert set(vgg["latency_ms"]) == {"full", "keras_predict"}
    for model in report["models"]:
        for stats in model["latency_ms"].values():
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
        assert all(v > 0 for v in model["throughput_ips"].values())
    per_class = ranet["exit_distribution"]["per_class"]
    assert len(per_class) == 10 and all(len(row) == 3 for row in per_class)
    assert vgg["params"] == 14724042 and len(vgg["exits"]) == 1
    markdown = (tmp_path / "report.md").read_text()
    for heading in ("## Latency at batch 1", "## ranet: anytime", "## ranet: operating points",
                    "## ranet: exit distribution"):
        assert heading in markdown
    for name in ("accuracy_vs_macs.png", "accuracy_vs_latency.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path / "tensorboard" / "ranet")


def test_validation_report_never_sees_its_calibration_images():
    splits = data.load_splits(SYNTHETIC)
    images = evaluation.evaluation_images(splits, "validation", seed=0)
    calibration, reported = images.calibration_images, images.report_images
    assert len(calibration) + len(reported) == SYNTHETIC.validation_size
    flat = lambda x: {row.tobytes() for row in x.reshape(len(x), -1)}  # noqa: E731
    assert not flat(calibration) & flat(reported)
    assert np.bincount(images.report_labels, minlength=10).min() >= 6  # class-balanced halves


def test_missing_test_split_is_a_clear_error():
    splits = data.load_splits(SYNTHETIC)
    without_test = data.DataSplits(**{**splits.__dict__, "test": None})
    with pytest.raises(data.DataError, match="test split is missing"):
        evaluation.evaluation_images(without_test, "test", seed=0)


@pytest.mark.parametrize("args, message", [
    (["--budget_mflops=1"], "below the cost of ranet's first exit"),
    (["--budget_mflops=x"], "--budget_mflops takes comma-separated numbers"),
    ([], "pass --report_dir"),
    (["--intra_op_threads=-1"], "intra_op_threads"),
])
def test_bad_requests_fail_cleanly(model_dirs, tmp_path, args, message):
    report_args = [] if args == [] else [f"--report_dir={tmp_path / 'out'}"]
    run = _eval(f"--model_dir={model_dirs[0]}", *report_args, *args)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_model_dir_without_checkpoints_fails_cleanly(tmp_path):
    empty = tmp_path / "untrained"
    empty.mkdir()
    config_lib.save(config_lib.ExperimentConfig(
        data=SYNTHETIC, model=RANET, optim=config_lib.OptimConfig(),
        runtime=config_lib.RuntimeConfig(model_dir=str(empty))), str(empty))
    run = _eval(f"--model_dir={empty}", f"--report_dir={tmp_path / 'out'}")
    assert run.returncode != 0
    assert "has no checkpoint" in run.stderr and "Traceback" not in run.stderr
