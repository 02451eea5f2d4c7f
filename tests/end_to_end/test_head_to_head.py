"""ranet.bench.head_to_head as a user runs it: trains, resumes, skips what is done, reports.

The contest's presets, shrunk by --train_flag to a tiny RANet on a few synthetic images, with
a tiny time budget per model; the evaluation on TensorFlow only, a few images timed.
"""

import json

import pytest

from helpers import python, tail

pytestmark = pytest.mark.end_to_end

TINY = ["--dataset=synthetic", "--synthetic_train_size=96", "--synthetic_test_size=32",
        "--validation_size=32", "--batch_size=16", "--reference_batch_size=16",
        "--scale_list=1-2", "--growth_factors=2-1", "--bottleneck_factors=2-1",
        "--growth_rate=4", "--base_channels=4", "--num_blocks=1", "--block_step=1", "--step=1",
        "--log_every_steps=2", "--checkpoint_every_steps=2"]
EVAL = ["--latency_images=4", "--warmup=1", "--throughput_images=16", "--batch_size=16"]


def _contest(out, *extra, models="ranet,vgg16", budget="12s"):
    return python("-m", "ranet.bench.head_to_head", f"--out={out}", f"--models={models}",
                  f"--time_budget={budget}", "--runtimes=tf", "--latency_blocks=1,2",
                  *[f"--train_flag={f}" for f in TINY], *[f"--eval_flag={f}" for f in EVAL],
                  *extra, timeout=900)


def test_the_contest_trains_resumes_and_reports(tmp_path):
    out = tmp_path / "contest"
    # VGG16's run interrupted at step 2 of its budget: the contest must resume it.
    interrupted = python("-m", "ranet.train", "--preset=vgg16_cifar10_1h_cpu",
                         f"--model_dir={out / 'models' / 'vgg16'}", "--time_budget=12s", *TINY,
                         "--stop_at_step=2", timeout=600)
    assert interrupted.returncode == 0, tail(interrupted)

    first = _contest(out)
    assert first.returncode == 0, tail(first)
    log = first.stderr
    assert "[1/2] training ranet (--preset=ranet_cifar10_1h_cpu --time_budget=12s)" in log
    assert "about 24s of training left in the contest" in log   # 2 models x 12 s
    assert f"resumed from {out / 'models' / 'vgg16' / 'checkpoints'}" in log
    # Evaluated once, timed once per block: one report each.
    reports = [out / "report" / f"latency_block{block}" for block in (1, 2)]
    report = json.loads((reports[0] / "report.json").read_text())
    assert json.loads((reports[1] / "report.json").read_text())["latency_block"] == 2
    assert log.count("ranet: accuracy of every exit") == 1
    assert [m["name"] for m in report["models"]] == ["ranet", "vgg16"]
    (entry,) = report["at_equal_accuracy"]["tf"]["ranet vs vgg16"]
    accuracy = entry["accuracy"]
    assert accuracy["vgg16"] == report["models"][1]["runtimes"]["tf"]["exits"][0]["accuracy"]
    low, high = entry["difference_ci95"]
    assert low <= accuracy["ranet"] - accuracy["vgg16"] <= high
    assert entry["points"]["ranet"]["path"] in \
        report["models"][0]["runtimes"]["tf"]["latency_ms"]
    assert "## At equal accuracy" in (reports[0] / "report.md").read_text()

    # Again: nothing is trained or evaluated twice.
    again = _contest(out)
    assert again.returncode == 0, tail(again)
    assert "[1/2] ranet is trained" in again.stderr and "[2/2] vgg16 is trained" in again.stderr
    assert "ranet.train" not in again.stderr and "is written; skipped" in again.stderr

    # Other settings in the same folder are refused before anything runs.
    changed = _contest(out, budget="30s")
    assert changed.returncode == 2
    assert "holds a contest with other settings (time_budget" in changed.stderr


def test_flag_errors_are_one_line(tmp_path):
    bad = python("-m", "ranet.bench.head_to_head", f"--out={tmp_path}", "--models=ranet,alexnet",
                 timeout=120)
    assert bad.returncode == 2
    assert "error: --models takes distinct names among ranet, msdnet, vgg16, resnet50, mobilenet_v2" \
        in bad.stderr and "Traceback" not in bad.stderr
