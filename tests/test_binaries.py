"""The binaries as a user meets them: flags in, files and messages out.

They run in-process (``cli.call``: a fresh set of flag values, the binary's own ``main``), as
the Flax examples test ``train_and_evaluate``; a subprocess proves only what ``cli.run`` adds
(one message, exit status 2, no traceback), tested once per binary at the end.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from helpers import REPO_ROOT, SYNTHETIC_DATA, VGG16, python, write_model_dir
from ranet import cli, eval as eval_binary, export, summary, train
from ranet import config as config_lib
from ranet.inference.serving import saved_model

# Per-exit cumulative multiply-adds of the reference PyTorch implementation (see test_costs.py).
SCRIPT_CIFAR10 = {
    "model": "ranet", "params": 3261830,
    "exits": [{"exit": k, "macs": macs} for k, macs in enumerate(
        [15814410, 31283220, 44655390, 50358312, 60654578, 63647996, 90173958, 94904592],
        start=1)]}


def _call(binary, *args):
    return cli.call(binary.main, binary.define_flags, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_model_dir(root / "ranet", logit_scale=6.0)
    write_model_dir(root / "vgg16", VGG16)
    return str(root / "ranet"), str(root / "vgg16")


# --------------------------------------------------------------------------------------------
# ranet.train

def test_train_preset_by_name_trains_and_records_its_flags(tmp_path, caplog):
    caplog.set_level("INFO", logger="absl")
    result = _call(train, "--preset=ranet_smoke", f"--model_dir={tmp_path}", "--train_steps=10")
    assert result["step"] == 10
    assert (tmp_path / "checkpoints" / "ckpt-10.index").exists()
    recorded = (tmp_path / "flags.txt").read_text().splitlines()
    assert "--scale_list=1-2-3" in recorded and "--train_steps=10" in recorded
    assert not any(line.startswith(("--flagfile", "--preset", "--help")) for line in recorded)
    assert "step 10/10" in caplog.text
    # The recorded flags are a flagfile of the same run.
    values = flags.FlagValues()
    train.define_flags(values)
    values(["train", f"--flagfile={tmp_path / 'flags.txt'}"])
    assert cli.experiment_config(values) == config_lib.load(str(tmp_path))


@pytest.mark.parametrize("args, error, message", [
    (["--model=foo"], flags.IllegalFlagValueError, "value should be one of <ranet|vgg16|resnet50>"),
    (["--train_steps=-3"], ValueError, "train_steps must be >= 0"),
    (["--scale_list=1-x"], ValueError, "--scale_list takes integers"),
    (["--scale_list=2-3"], ValueError, "scale_list must start at 1"),
    (["--strategy=mirrored", "--num_cpu_devices=2", "--batch_size=33"], ValueError,
     "multiple of 2"),
    (["--dataset=cifar10", "--data_dir=/nonexistent/cifar"], ValueError, "--data_dir"),
    (["--model_dir="], ValueError, "model_dir is required"),
    (["--preset=nope"], ValueError, "preset must be one of .*ranet_smoke"),
    (["--train_steps=0", "--time_budget=soon"], ValueError,
     "time_budget takes a duration such as 90s, 12m, 8h or 1h30m"),
    (["--time_budget=1h"], ValueError, "--time_budget and --train_steps both set the length"),
    (["--schedule=exponential"], flags.IllegalFlagValueError,
     "value should be one of <multistep|cosine|linear>"),
    (["stray"], ValueError, "unexpected arguments: stray"),
])
def test_train_bad_input_says_how_to_fix_it_and_writes_nothing(tmp_path, args, error, message):
    with pytest.raises(error, match=message):
        _call(train, "--preset=ranet_smoke", f"--model_dir={tmp_path}", *args)
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "config.json").exists()


# --------------------------------------------------------------------------------------------
# ranet.summary

def test_summary_json_of_the_reference_script_preset(capsys):
    _call(summary, "--preset=ranet_cifar10", "--json")
    assert json.loads(capsys.readouterr().out) == SCRIPT_CIFAR10  # stdout holds only the JSON


def test_summary_table_matches_the_library(capsys):
    from ranet import costs, models
    from helpers import TINY_RANET
    _call(summary, "--preset=ranet_smoke")
    out = capsys.readouterr().out.strip()
    cost = costs.count(models.get_model(TINY_RANET))
    assert out == costs.format_table(cost)
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["1", "2", "3"]


def test_summary_bad_scale_list_names_the_flag():
    with pytest.raises(ValueError, match=r"--scale_list.*Received: --scale_list=a-b"):
        _call(summary, "--scale_list=a-b", "--json")


# --------------------------------------------------------------------------------------------
# ranet.eval

def test_eval_report_has_every_section_for_ranet_and_a_baseline(model_dirs, tmp_path):
    ranet_dir, vgg_dir = model_dirs
    _call(eval_binary, f"--model_dir={ranet_dir}", f"--model_dir={vgg_dir}", "--split=test",
          "--budget_mflops=2,3", "--threshold=0.85", f"--report_dir={tmp_path}",
          "--latency_images=8", "--warmup=2", "--throughput_images=32", "--batch_size=16")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["split"] == "test" and report["calibration_split"] == "validation"
    assert report["num_images"] == SYNTHETIC_DATA.synthetic_test_size
    assert report["tensorflow"] == tf.__version__ and report["device"].startswith("CPU")
    assert [m["name"] for m in report["models"]] == ["ranet", "vgg16"]
    assert report["models"][1]["params"] == 14724042
    ranet, vgg = (model["runtimes"]["tf"] for model in report["models"])
    assert [e["exit"] for e in ranet["exits"]] == [1, 2, 3]
    assert all(set(e) == {"exit", "macs", "accuracy"} for e in ranet["exits"])
    assert ranet["exits"][0]["macs"] < ranet["exits"][-1]["macs"]
    kinds = [b["point"]["kind"] for b in ranet["budgeted"]]
    assert kinds.count("sweep") == 39 and kinds.count("budget") == 2
    assert kinds.count("fixed_threshold") == 1
    for point in ranet["budgeted"]:
        assert {"thresholds", "expected_macs", "accuracy", "exit_fractions"} <= set(point)
        assert sum(point["exit_fractions"]) == pytest.approx(1.0)
        assert point["thresholds"][-1] == "-inf"
    fixed = next(b for b in ranet["budgeted"] if b["point"]["kind"] == "fixed_threshold")
    assert fixed["thresholds"] == [0.85, 0.85, "-inf"] and fixed["path"] == "threshold@0.85"
    # The point at VGG16's accuracy is timed too, unless it is one of the others.
    (matched,) = report["at_equal_accuracy"]["tf"]["ranet vs vgg16"]
    equal = matched["points"]["ranet"]["path"]
    assert set(ranet["latency_ms"]) == {"adaptive", "budget@2", "budget@3", "full",
                                        "keras_predict", "exit_1", "exit_2", "exit_3", equal}
    # Every adaptive path: where its timed images left, and what that costs up to there.
    for path in ("adaptive", "budget@2", "budget@3", equal):
        timed = ranet["latency_ms"][path]
        assert sum(timed["exit_fractions"]) == pytest.approx(1.0)
        assert timed["overhead"] == pytest.approx(timed["mean"] / timed["expected_ms"])
    assert set(vgg["latency_ms"]) == {"full", "keras_predict"}
    for view in (ranet, vgg):
        for stats in view["latency_ms"].values():
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
        assert all(v > 0 for v in view["throughput_ips"].values())
    per_class = ranet["exit_distribution"]["per_class"]
    assert len(per_class) == 10 and all(len(row) == 3 for row in per_class)
    assert len(vgg["exits"]) == 1 and vgg["default"] is None
    markdown = (tmp_path / "report.md").read_text()
    for heading in ("## Latency at batch 1", "## ranet: anytime", "## ranet: operating points",
                    "## ranet: exit distribution"):
        assert heading in markdown
    for name in ("accuracy_vs_macs.png", "accuracy_vs_latency.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path / "tensorboard" / "ranet")


@pytest.mark.slow  # int8 conversions of every file
def test_eval_measures_every_runtime_side_by_side(model_dirs, tmp_path):
    _call(eval_binary, f"--model_dir={model_dirs[0]}", "--split=test", "--budget_mflops=3",
          "--runtimes=tf,litert,litert_int8", f"--report_dir={tmp_path}", "--latency_images=6",
          "--warmup=1", "--throughput_images=8", "--batch_size=8")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["runtimes"] == ["tf", "litert", "litert_int8"]
    (ranet,) = report["models"]
    anytime = {"exit_1", "exit_2", "exit_3"}
    assert set(ranet["runtimes"]["tf"]["latency_ms"]) == {"adaptive", "budget@3", "full",
                                                          "keras_predict", *anytime}
    for runtime in ("litert", "litert_int8"):
        entry = ranet["runtimes"][runtime]
        assert set(entry["latency_ms"]) == {"adaptive", "budget@3", "full", *anytime}
        assert "overhead" in entry["latency_ms"]["adaptive"]
        assert [e["exit"] for e in entry["exits"]] == [1, 2, 3]
        assert entry["default"]["thresholds"][-1] == "-inf"
        assert sum(1 for point in entry["budgeted"] if point["point"]["kind"] == "budget") == 1
    # fp32 LiteRT answers as TensorFlow does: the same accuracy at every exit.
    assert [e["accuracy"] for e in ranet["runtimes"]["litert"]["exits"]] == [
        e["accuracy"] for e in ranet["runtimes"]["tf"]["exits"]]
    markdown = (tmp_path / "report.md").read_text()
    assert "| ranet | litert_int8 | adaptive |" in markdown
    assert "## ranet: operating points (litert)" in markdown


@pytest.mark.parametrize("args, message", [
    (["--runtimes=tf,onnx"], "runtimes must include tf and be distinct names among tf, "
                             "litert, litert_int8"),
    (["--runtimes=litert"], "runtimes must include tf"),
    (["--budget_mflops=1"], "below the cost of ranet's first exit"),
    (["--budget_mflops=x"], "--budget_mflops takes comma-separated numbers"),
    (["--budget_mflops=-2"], "--budget_mflops must be positive"),
    (["--litert_threads=many"], "--litert_threads takes a count of threads .* or auto"),
    (["--latency_block=1,0"], "--latency_block takes distinct positive integers"),
    ([], "pass --report_dir"),
])
def test_eval_bad_requests_fail_cleanly(model_dirs, tmp_path, args, message):
    report_args = [] if args == [] else [f"--report_dir={tmp_path / 'out'}"]
    with pytest.raises(ValueError, match=message):
        _call(eval_binary, f"--model_dir={model_dirs[0]}", *report_args, *args)
    assert not (tmp_path / "out").exists()


def test_eval_needs_a_model_dir_with_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="pass at least one --model_dir"):
        _call(eval_binary, f"--report_dir={tmp_path / 'out'}")
    write_model_dir(tmp_path / "untrained", with_checkpoint=False)
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        _call(eval_binary, f"--model_dir={tmp_path / 'untrained'}",
              f"--report_dir={tmp_path / 'out'}")
    with pytest.raises(flags.IllegalFlagValueError, match="intra_op_threads"):
        _call(eval_binary, f"--model_dir={tmp_path}", "--intra_op_threads=-1")


# --------------------------------------------------------------------------------------------
# ranet.export

def test_export_a_fixed_threshold(model_dirs, tmp_path, caplog):
    caplog.set_level("INFO", logger="absl")
    export_dir = tmp_path / "ranet" / "1"
    _call(export, f"--model_dir={model_dirs[0]}", f"--export_dir={export_dir}",
          "--threshold=0.85", "--checkpoint=latest")
    assert (export_dir / "saved_model.pb").is_file()
    assert "exported to" in caplog.text
    metadata = json.loads((export_dir / "assets.extra" / saved_model.METADATA_FILENAME)
                          .read_text())
    expected = [0.85, 0.85, -np.inf]
    assert [float(t) for t in metadata["thresholds"]] == expected
    assert metadata["operating_point"] == {"rule": "fixed_threshold", "threshold": 0.85}
    # The variable the serving graph reads, straight from the SavedModel's checkpoint.
    reader = tf.train.load_checkpoint(str(export_dir / "variables" / "variables"))
    np.testing.assert_array_equal(
        reader.get_tensor("thresholds/.ATTRIBUTES/VARIABLE_VALUE"), np.float32(expected))


def test_export_litert_writes_stage_files_and_a_manifest(model_dirs, tmp_path):
    export_dir = tmp_path / "litert"
    manifest = _call(export, f"--model_dir={model_dirs[0]}", f"--export_dir={export_dir}",
                     "--format=litert", "--litert_precision=fp32", "--budget_mflops=2,3")
    assert sorted(os.listdir(export_dir)) == ["fp32", "manifest.json"]
    assert sorted(os.listdir(export_dir / "fp32")) == [
        "all_exits.tflite", "all_exits_batch32.tflite", "exits_1_to_1.tflite",
        "exits_1_to_2.tflite", "from_stage2.tflite", *[f"stage{k}.tflite" for k in (1, 2, 3)]]
    assert json.loads((export_dir / "manifest.json").read_text()) == manifest
    assert set(manifest["precisions"]["fp32"]["thresholds"]["budgets"]) == {"2", "3"}


@pytest.mark.slow
def test_a_barely_trained_model_exports_in_both_formats(tmp_path):
    # Three steps leave exits whose confidences say little: no threshold point may come
    # within a point of the last exit, and the default point is then "every image to the last
    # exit" (test_evaluation proves that rule by hand); the export must still write files.
    model_dir = tmp_path / "barely"
    _call(train, "--preset=ranet_smoke", f"--model_dir={model_dir}", "--train_steps=3")
    _call(export, f"--model_dir={model_dir}", f"--export_dir={tmp_path / 'saved' / '1'}")
    metadata = json.loads((tmp_path / "saved" / "1" / "assets.extra"
                           / saved_model.METADATA_FILENAME).read_text())
    assert metadata["operating_point"]["rule"] == "default"
    assert len(metadata["thresholds"]) == 3 and float(metadata["thresholds"][-1]) == -np.inf
    manifest = _call(export, f"--model_dir={model_dir}", f"--export_dir={tmp_path / 'litert'}",
                     "--format=litert", "--litert_precision=fp32")
    default = manifest["precisions"]["fp32"]["thresholds"]["default"]
    assert len(default) == 3 and float(default[-1]) == -np.inf


def test_export_without_checkpoint_names_the_directory(tmp_path):
    write_model_dir(tmp_path / "untrained", with_checkpoint=False)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'untrained'} has no checkpoint"):
        _call(export, f"--model_dir={tmp_path / 'untrained'}", f"--export_dir={tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_export_dir(model_dirs, tmp_path):
    export_dir = tmp_path / "1"
    export_dir.mkdir()
    (export_dir / "keep.txt").write_text("someone's model")
    with pytest.raises(ValueError, match="already exists and is not empty.*--overwrite"):
        _call(export, f"--model_dir={model_dirs[0]}", f"--export_dir={export_dir}")
    assert sorted(os.listdir(export_dir)) == ["keep.txt"]


@pytest.mark.parametrize("args, message", [
    (("--budget_mflops=5", "--threshold=0.85"), "pass at most one"),
    (("--budget_mflops=0",), "--budget_mflops must be a positive number"),
    (("extra",), "unexpected arguments: extra"),
    (("--export_dir=",), "--export_dir is required"),
    (("--budget_mflops=2,3",), "a SavedModel serves one operating point"),
    (("--format=litert", "--litert_precision=fp16"), "litert_precision must be one or more"),
])
def test_export_refuses_bad_flags(args, message, model_dirs, tmp_path):
    with pytest.raises(ValueError, match=message):
        _call(export, f"--model_dir={model_dirs[0]}", f"--export_dir={tmp_path / '1'}", *args)
    assert not (tmp_path / "1").exists()


# --------------------------------------------------------------------------------------------
# What only a real process shows: cli.run's one-line error, exit status 2, no traceback.

@pytest.mark.parametrize("module, args, message", [
    ("ranet.train", ["--preset=ranet_smoke", "--scale_list=2-3"], "scale_list must start at 1"),
    ("ranet.eval", ["--model_dir=/nowhere", "--report_dir=/tmp/x"], "/nowhere/config.json"),
])
def test_a_bad_request_ends_the_process_with_one_line_and_status_2(module, args, message):
    process = python("-m", module, *args, timeout=120)
    assert process.returncode == 2, process.stderr[-2000:]
    assert "error: " in process.stderr and message in process.stderr
    assert "Traceback" not in process.stderr and process.stdout == ""


def test_every_preset_parses_into_a_valid_config():
    names = cli.preset_names()
    assert sorted(names) == sorted(name[:-4] for name in os.listdir(REPO_ROOT / "flags")
                                   if name.endswith(".cfg"))
    for name in names:
        config = cli.preset_config(name)
        assert config.runtime.model_dir == f"runs/{name}", name


def test_gpu_short_preset_is_the_cifar_network_on_a_shorter_mixed_precision_schedule():
    full, short = cli.preset_config("ranet_cifar10"), cli.preset_config("ranet_cifar10_gpu_short")
    assert short.model == full.model
    assert short.optim.epochs == 15 < full.optim.epochs
    assert (short.runtime.precision, short.runtime.xla) == ("mixed_float16", True)
